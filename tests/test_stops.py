"""Stop requests: SIGINT and SIGTERM raise Stopped, or are held for the training loop to act on."""

import os
import signal

import pytest

from acis_jax.stops import Stopped, stops_deferred, stops_raise


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_raises_stopped_with_the_shells_exit_code(signum, code):
  with pytest.raises(Stopped) as stopped, stops_raise():
    os.kill(os.getpid(), signum)
  assert stopped.value.exit_code == code
  assert signal.Signals(signum).name in str(stopped.value)
  assert "the same command" in str(stopped.value)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_deferred_signal_waits_for_the_loop_and_a_second_one_does_not(signum):
  with stops_raise(), stops_deferred() as request:
    os.kill(os.getpid(), signum)
    assert request.signum == signum  # recorded, nothing raised
    with pytest.raises(Stopped, match="asked again"):
      os.kill(os.getpid(), signum)


def test_the_previous_handlers_come_back():
  before = signal.getsignal(signal.SIGTERM)
  with stops_raise(), stops_deferred():
    pass
  assert signal.getsignal(signal.SIGTERM) is before
