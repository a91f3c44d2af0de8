"""`Scheduler.call`: other work on the model (moderation scoring) run by the step loop's own
thread between two steps, while requests are being generated."""

from __future__ import annotations

import threading

import pytest
from test_scheduler import EOS, Client, Decoder, tiny_model

from mistral7b.engine import Engine
from mistral7b.request import ShuttingDownError
from mistral7b.scheduler import Scheduler


def test_calls_run_on_the_loop_thread_between_steps():
    model, config = tiny_model()
    engine = Engine(model, config, kv_cache_memory=2**22)
    sched = Scheduler(engine, stop_ids=frozenset({EOS}), new_decoder=Decoder,
                      max_model_len=128)
    sched.start()
    try:
        assert sched.call(lambda: threading.current_thread().name).result(30) == \
            "mistral7b-scheduler"                               # idle loop: woken for it
        client = Client(sched, [1, 5, 9, 13], max_tokens=40, ignore_eos=True)
        logits = sched.call(lambda: engine.logits([1, 5, 9])).result(30)   # while busy
        assert logits.shape == (3, config.vocab_size)
        with pytest.raises(ValueError, match="boom"):
            sched.call(lambda: (_ for _ in ()).throw(ValueError("boom"))).result(30)
        tokens, finish, _ = client.result()
        assert len(tokens[0]) == 40 and finish[0] == "length"
    finally:
        sched.close(timeout=30)
    with pytest.raises(ShuttingDownError):
        sched.call(lambda: None)
