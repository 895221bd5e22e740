"""Errors a user can cause become one line; bugs keep their traceback."""

import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from manualbp.lit import NonFiniteLossError, user_message


def test_a_data_error_inside_instantiate_is_unwrapped_to_its_own_message(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(InstantiationException) as info:
        instantiate({"_target_": "manualbp.data.MNISTDataModule", "path": str(missing)})
    message = user_message(info.value)
    assert message.startswith("mnist: data.path=") and str(missing) in message
    assert "train-images-idx3-ubyte" in message and "\n" not in message


def test_an_unknown_target_is_one_line_naming_it():
    with pytest.raises(InstantiationException) as info:
        instantiate({"_target_": "manualbp.NoSuchNet"})
    message = user_message(info.value)
    assert "manualbp.NoSuchNet" in message and "\n" not in message


def test_a_worker_process_error_is_read_from_its_traceback_text():
    class ProcessRaisedException(Exception):  # torch.multiprocessing's, by name
        pass

    text = ("\n\n-- Process 0 terminated with the following error:\nTraceback (most recent call "
            "last):\n  File \"x.py\", line 1, in f\nmanualbp.lit.nonfinite.NonFiniteLossError: "
            "train/loss is nan at step 3\n")
    assert user_message(ProcessRaisedException(text)) == "train/loss is nan at step 3"
    bug = text.replace("manualbp.lit.nonfinite.NonFiniteLossError", "AttributeError")
    assert user_message(ProcessRaisedException(bug)) is None


def test_user_errors_are_one_line_and_bugs_are_not_caught():
    assert user_message(NonFiniteLossError("a\nb")) == "a b"
    assert user_message(ValueError("model.sizes: expected ...")) == "model.sizes: expected ..."
    assert user_message(AttributeError("'NoneType' object has no attribute 'x'")) is None
    assert user_message(ZeroDivisionError()) is None
