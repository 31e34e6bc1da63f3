"""The Hugging Face callback under the Trainer's own DDP: the ranks compare configurations.

The Trainer hands its callbacks the unwrapped model, never the DDP wrapper that
accelerate makes, so the callback finds the replicas from accelerate's state.
Two gloo ranks on the CPU, launched with torchrun in fresh processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gradclip.commands.bench_distributed import free_port

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

SCRIPT = textwrap.dedent(
    """
    import os

    import torch
    import torch.distributed as dist
    import transformers
    from torch import nn

    from gradclip import RankMismatchError
    from gradclip.integrations.transformers import GradientNormalizationCallback

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])


    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {"x": torch.randn(4, generator=g), "labels": torch.randn(1, generator=g)}


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 1)

        def forward(self, x, labels=None):
            out = self.b(torch.tanh(self.a(x)))
            return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


    def train(threshold):
        callback = GradientNormalizationCallback("ClipL2PerLayer", 0.05, {"b": threshold})
        args = transformers.TrainingArguments(
            output_dir=os.environ["OUT"], max_steps=2, per_device_train_batch_size=2,
            max_grad_norm=0.0, report_to="none", use_cpu=True, disable_tqdm=True,
            save_strategy="no", ddp_backend="gloo")
        trainer = transformers.Trainer(
            model=Net(), args=args, train_dataset=Data(), callbacks=[callback])
        trainer.train()
        assert isinstance(trainer.model_wrapped, nn.parallel.DistributedDataParallel)
        return callback


    callback = train(("ClipL2PerLayer", 0.5))  # the same configuration on both ranks
    assert callback.normalizer.process_group is dist.group.WORLD
    try:
        train(("ClipL2PerLayer", 0.5 if rank == 0 else 0.25))  # rank 1 configured otherwise
    except RankMismatchError as error:
        assert "differ at layer 'b'" in str(error), error
        print(f"rank {rank} ok", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # skip the interpreter teardown, which gloo on the CPU can abort (a PyTorch issue)
    """
)


def test_ranks_of_the_trainers_ddp_compare_configurations(tmp_path: Path) -> None:
    script = tmp_path / "ranks.py"
    script.write_text(SCRIPT)
    env = {
        **os.environ,
        "OUT": str(tmp_path / "out"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(sys.path),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    command += [f"--master_port={free_port()}", str(script)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "rank 0 ok" in out and "rank 1 ok" in out, out[-4000:]
