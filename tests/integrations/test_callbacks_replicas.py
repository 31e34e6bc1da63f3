"""The trainer callbacks tell their normalizers which ranks hold replicas.

Under a DDP strategy (Lightning) or a DDP-wrapped model (Hugging Face), the
callbacks build their normalizers on the unwrapped module; the DDP wrapper's
process group is passed on as ``process_group=``, so that the ranks compare
their configurations at the first step as a DDP target's normalizer does
(`gradclip.core.agreement`). Run in a fresh process holding a one-rank gloo
group, so that no process group outlives the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from gradclip.commands.bench_distributed import free_port

pytest.importorskip("lightning")
pytest.importorskip("transformers")

SCRIPT = textwrap.dedent(
    """
    import os
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist
    from torch import nn

    from gradclip.integrations.lightning import GradientNormalizationCallback as LightningCallback
    from gradclip.integrations.transformers import GradientNormalizationCallback as HFCallback

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        ddp = nn.parallel.DistributedDataParallel(model)

        hf = HFCallback("ClipL2PerLayer", 1.0)
        hf._ensure(ddp)
        assert hf.normalizer.process_group is ddp.process_group, hf.normalizer.process_group
        plain = HFCallback("ClipL2PerLayer", 1.0)
        plain._ensure(model)
        assert plain.normalizer.process_group is None

        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        trainer = SimpleNamespace(strategy=SimpleNamespace(model=ddp), optimizers=[optimizer])
        lightning = LightningCallback("ClipL2PerLayer", 1.0)
        lightning.on_fit_start(trainer, model)
        (normalizer,) = lightning.normalizers
        assert normalizer.process_group is ddp.process_group, normalizer.process_group

        # the first step compares the configurations (one rank: they agree) and clips
        ddp(torch.randn(16, 4)).pow(2).sum().mul(100).backward()
        report = normalizer.apply()
        assert all(n > 1.0 for n in report.to_dict()["layer_norms"].values())
        after = [torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in m.parameters()]))
                 for m in (model[0], model[2])]
        assert all(abs(float(n) - 1.0) < 1e-4 for n in after), after
        print("ok")
    finally:
        dist.destroy_process_group()
    """
)


def test_callbacks_pass_the_ddp_group_on_as_the_replicas() -> None:
    env = {**os.environ, "PORT": str(free_port()), "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
