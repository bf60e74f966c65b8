"""moeserve: cheap, fast Mixture-of-Experts serving when GPU memory or money is short."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("moeserve")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"
