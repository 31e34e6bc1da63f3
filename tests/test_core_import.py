"""The core imports and works with torch alone: `import gradclip` imports no optional extra."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKED = ("lightning", "pytorch_lightning", "transformers", "tensorboard", "matplotlib", "yaml")

SCRIPT = textwrap.dedent(
    f"""
    import importlib.abc
    import sys

    BLOCKED = {BLOCKED!r}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]

    import torch
    import gradclip
    import gradclip.config
    import gradclip.integrations.writers
    import gradclip.integrations

    for name in BLOCKED:
        try:
            __import__(name)
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit(f"the blocker let {{name}} through")

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model(torch.randn(3, 4)).pow(2).sum().mul(100).backward()
    report = gradclip.normalize_(model, "ClipL2PerLayer", threshold=0.5)
    for layer in ("0", "1"):
        grads = [p.grad.flatten() for p in model[int(layer)].parameters()]
        assert float(torch.cat(grads).norm()) <= 0.5 + 1e-5
    assert report.to_dict()["changed"] == {{"0": True, "1": True}}
    normalizer = gradclip.GradientNormalizer.from_config(
        model, {{"gradientNormalization": "ClipL2PerParamType", "layers": {{"1": "None"}}}})
    assert "ClipL2PerParamType" in normalizer.describe()

    try:
        import gradclip.integrations.lightning
    except ImportError as error:
        assert "gradclip[lightning]" in str(error), error
    else:
        raise SystemExit("the Lightning integration imported without Lightning")

    leaked = sorted({{m.split(".")[0] for m in sys.modules}} & set(BLOCKED))
    assert not leaked, leaked
    print("core ok")
    """
)


def test_core_works_without_the_extras() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=False, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "core ok" in done.stdout
