import pytest

from tests import ggml_oracle


@pytest.fixture
def oracle():
    """Skip unless ggml itself can be called (QUANTCLI_GGML_LIB or llama-cpp-python)."""
    if ggml_oracle.load() is None:
        pytest.skip("libggml-base not found; set QUANTCLI_GGML_LIB to compare with ggml")
