"""Callbacks for training loops written by someone else.

* `gradclip.integrations.lightning` — a Lightning ``Callback``
  (``pip install gradclip[lightning]``);
* `gradclip.integrations.transformers` — a Hugging Face ``TrainerCallback``
  (``pip install gradclip[transformers]``).

Each submodule imports its framework when it is imported itself; importing
``gradclip`` or this package never does.
"""

__all__: list[str] = []
