"""CLIP features: the only place cmhash runs CLIP. Extraction, search and serve all encode with
the encoder here.

clip.py         open_clip models by name and weights (a tag, a local file, or seeded random init)
encoding.py     images and captions to float32 features (`Encoder` for extract, `ClipEncoder` for queries)
extraction.py   a collection in resumable shards, split across processes
shards.py       the work folder of finished shards
precomputed.py  extract's output for precomputed features (data.name: features): no CLIP runs
store.py        stages/extract/<split>.pkl loaded onto a device, checked on the way in
"""
