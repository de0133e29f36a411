import time

import pytest

from innercontrol.hub import HubUnreachableError, resolve_model


def test_local_path_passes_through(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)


def test_missing_local_path_names_the_key():
    with pytest.raises(FileNotFoundError, match="model.pretrained_model"):
        resolve_model("./no/such/folder")


def test_unreachable_hub_id_fails_fast_with_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(HubUnreachableError, match=r"not in the local cache.*pass model.pretrained_model=DIR"):
        resolve_model("someone/not-a-cached-model")
    assert time.monotonic() - start < 5
