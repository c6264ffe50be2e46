"""oak-edge-agent: deploy neural networks onto Luxonis OAK cameras over MQTT."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("oak-edge-agent")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
