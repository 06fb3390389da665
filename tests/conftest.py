import prima_ref  # noqa: F401  (sets Numba codegen flags before numba is imported)

import pytest

from prima_ref import fetch


@pytest.fixture(scope="session")
def smollm2_path():
    return fetch.fetch(fetch.SMOLLM2_Q4_1)


@pytest.fixture(scope="session")
def gemma3_path():
    return fetch.fetch(fetch.GEMMA3_270M)


@pytest.fixture(scope="session")
def smollm2_q8_0_path(smollm2_path):
    from prima_ref.derived import smollm2_q8_0

    return smollm2_q8_0()
