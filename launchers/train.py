#!/usr/bin/env python
"""Train a MoLE model with DeepSpeed:

    deepspeed launchers/train.py --deepspeed ds_configs/zero3_ep.json [--config run.yaml] [--section.key value ...]
"""
import sys

from mole_ds.train.launch import main

if __name__ == "__main__":
    sys.exit(main())
