"""The named choices of params.yaml, one registry each, with every entry's knobs. Pure config:
nothing here imports torch or the implementations (see cmhash.config.registry).

losses.py      `loss` and `losses.<name>`                 implementations: cmhash.losses
archs.py       `model.arch`, `model.<arch>`, `hash_head`   cmhash.models
schedules.py   `train.schedule`                           cmhash.training.schedule
optimizers.py  `train.optimizer`                          torch.optim
datasets.py    `data.name` and `data.<name>`              cmhash.data.datasets
baselines.py   `baselines.methods`, `baselines.<name>`     cmhash.baselines.methods
indexes.py     `search.index`, `search.<kind>`            cmhash.search.kinds
"""
