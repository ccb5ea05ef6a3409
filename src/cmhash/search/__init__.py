"""Use trained codes: `cmhash index` packs a collection's codes into FAISS binary indexes,
`cmhash search` encodes one query the same way and ranks the other modality by Hamming distance.

index.py     the code index on disk and exact top-k search (ties by database row)
hashing.py   a hash model -> ±1 codes of CLIP features, strict protocol
sources.py   what can be indexed: a pipeline split, an image folder, a captions file
engine.py    build an index; search one with a query
commands.py  the two Typer commands
results.py   the result list as a table
"""
