"""dmriharmony: pool multi-site diffusion MRI honestly.

DTI with DIPY, ENIGMA-style TBSS without FSL, and the four families of harmonization
(meta-analysis, mixed-effects mega-analysis, ComBat and variants, site-adversarial VAE,
plus RISH), evaluated side by side. See ``README.md`` and ``DESIGN.md``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dmriharmony")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.1.0"

__all__ = ["__version__"]
