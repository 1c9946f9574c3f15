"""Fixtures shared by the test modules."""
import pytest
from training_helpers import one_thread


@pytest.fixture
def single_thread():
    """The test runs on one intra-op thread (:class:`training_helpers.one_thread`); a module
    opts in with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    with one_thread():
        yield
