"""Where and how a stage runs: the torch device, numeric precision, seeding, several processes
(torchrun) and progress bars.

device.py       params.yaml `device` as a torch device (cuda:LOCAL_RANK under torchrun)
precision.py    fp32 / bf16 / fp16 autocast and loss scaling
seeding.py      one seed for every random number generator
distributed.py  process groups, collectives, the elastic relaunch, the batch-split rule
launch.py       how a command starts when it may run in several processes
progress.py     Rich progress bars
"""
