"""Reading recordings: findings, calibrated configurations and a picture of the run.

A recording is written by ``GradientNormalizer(model, mode, record=PATH)``
(see `gradclip.core.record`). This package needs numpy (the ``demo`` extra
brings it; the picture needs matplotlib, the ``plot`` extra); ``import
gradclip`` does not import it.

Examples:
    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.gcrec"
    >>> monitor = gradclip.GradientNormalizer(model, None, record=path)
    >>> _ = monitor.apply()
    >>> monitor.close()
    >>> from gradclip import insight
    >>> insight.findings(insight.load(path))["layers"]
    ['encoder', 'blocks.0', 'blocks.2', 'head']
"""

from gradclip.insight.calibrate import DEFAULT_PERCENTILE, Calibration, calibrate
from gradclip.insight.files import write_config
from gradclip.insight.findings import Rules, findings
from gradclip.insight.reader import RecordedRun, load
from gradclip.insight.summary import to_json, to_text

__all__ = [
    "DEFAULT_PERCENTILE",
    "Calibration",
    "RecordedRun",
    "Rules",
    "calibrate",
    "findings",
    "load",
    "to_json",
    "to_text",
    "write_config",
]
