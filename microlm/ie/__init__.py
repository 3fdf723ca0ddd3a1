"""Pipeline B: InstructIE-style relation-extraction data (B1–B2), LoRA on a causal LM (B3), evaluation
(B4) and the merge (B5); serving is ``microlm.serve``."""

# the 12 InstructIE topics (cate) with their English schema names, and the extra topic for
# relations no topic takes (``ie_data.unmapped_topic``) — for plots without a CJK font
TOPICS_EN = {"人物": "Person", "地理地区": "Geographic_Location", "建筑": "Building", "作品": "Works",
             "生物": "Creature", "人造物件": "Artificial_Object", "自然科学": "Natural_Science",
             "组织": "Organization", "运输": "Transport", "事件": "Event", "天文对象": "Astronomy",
             "医学": "Medicine", "其他": "Other (unmapped)"}
