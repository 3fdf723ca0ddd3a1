"""The raw relation-extraction formats step 01 reads (``ie_data.sources`` maps a glob to one of these;
``microlm.ie.standardize.ADAPTERS`` has one adapter per name)."""

IE_FORMATS = ("instructie", "iepile_sample", "duie_spo", "cmeie", "deepke_csv", "finre", "sanwen", "people_tsv",
              "people_xlsx")
