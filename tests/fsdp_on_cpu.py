"""``accelerate launch --config_file configs/accelerate/fsdp.yaml tests/fsdp_on_cpu.py train.py ARGS``: train.py
under FSDP on CPUs, for the tests only.

accelerate (1.16) shards on GPUs only: on CPUs (``ACCELERATE_USE_CPU=1``, gloo) it sets a run up as DDP
(``MULTI_CPU``) even under an FSDP config, and simcse_flat then refuses it in one line. FSDP2 itself
(``torch.distributed.fsdp.fully_shard``) runs on CPUs with gloo, so this CPU-only override turns accelerate's state
back into the FSDP one the config asked for (its FSDP plugin is built from the config as on GPUs), then runs the
script: from there everything (``prepare``, the sharding, ``no_sync``, clipping) is accelerate's own FSDP2 path.
"""

import runpy
import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

_accelerate_init = AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _accelerate_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # what AcceleratorState.__init__ does for an FSDP run on GPUs
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin


if __name__ == "__main__":
    AcceleratorState.__init__ = _fsdp_on_cpu
    sys.argv = sys.argv[1:]  # train.py ARGS, as the script sees them when launched itself
    runpy.run_path(sys.argv[0], run_name="__main__")
