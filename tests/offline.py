"""An autouse fixture for CLI tests: no download may happen, and DiffSynth's environment variables are unset.
Import it into a test module (`from tests.offline import no_network  # noqa: F401`) to apply it there."""
import pytest

from flux_core import model_config


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected download: {args} {kwargs}")
    monkeypatch.setattr(model_config, "download_from_modelscope", refuse)
    monkeypatch.delenv(model_config.ENV_MODEL_BASE_PATH, raising=False)
    monkeypatch.delenv(model_config.ENV_SKIP_DOWNLOAD, raising=False)
