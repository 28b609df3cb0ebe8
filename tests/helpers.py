"""Re-export of the conftest helpers for test modules (pytest imports conftest itself)."""

from conftest import (  # noqa: F401
    F32,
    I64,
    MODELS,
    ROOT,
    accuracy,
    assert_same_outputs,
    digits_eval,
    make_model,
    run_ort,
    save_model,
)
