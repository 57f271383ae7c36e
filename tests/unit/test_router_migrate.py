"""Stream migration's bookkeeping (router/migrate.py): which requests may migrate, and the
tracker that relays SSE events whole while counting the token ids the client got."""

from __future__ import annotations

from pdserve.router.migrate import StreamTracker, migratable


def test_which_requests_migrate() -> None:
    assert migratable({"prompt": "x", "stream": True}, 3)
    assert migratable({"messages": [], "stream": True, "n": 1}, 3)
    assert migratable({"input_ids": [1, 2], "stream": True, "sampling_params": {"max_new_tokens": 4}}, 1)
    assert not migratable({"prompt": "x", "stream": True}, 0)  # --migration-limit 0
    assert not migratable({"prompt": "x"}, 3)  # not streamed: a failure before the answer is a retry
    assert not migratable({"prompt": "x", "stream": True, "n": 2}, 3)
    assert not migratable({"text": ["a", "b"], "stream": True}, 3)  # a batch
    assert not migratable({"input_ids": [[1], [2]], "stream": True}, 3)
    assert not migratable({"prompt": "x", "stream": True, "logprobs": 2}, 3)
    assert not migratable({"text": "x", "stream": True, "return_logprob": True}, 3)
    assert not migratable({"text": "x", "stream": True, "sampling_params": {"n": 3}}, 3)


def test_tracker_strips_ids_and_counts_only_events_handed_on() -> None:
    t = StreamTracker()
    stream = (b'data: {"role": 1}\n\n: pdserve-ids 5,6\ndata: {"t": "ab"}\n\n: pdserve-ids 7\n\n'
              b': pdserve-ids 8\ndata: {"t": "c"}\n\ndata: [DONE]\n\n')
    out = b""
    for i in range(0, len(stream), 7):  # split anywhere, even inside an event
        out += t.feed(stream[i:i + 7])
    out += t.flush()
    assert out == b'data: {"role": 1}\n\ndata: {"t": "ab"}\n\ndata: {"t": "c"}\n\ndata: [DONE]\n\n'
    assert t.ids == [5, 6, 7, 8] and t.done


def test_tracker_drops_a_cut_off_event_on_restart() -> None:
    t = StreamTracker()
    assert t.feed(b': pdserve-ids 1\ndata: {"a": 1}\n\n: pdserve-ids 2\ndata: {"b"') == b'data: {"a": 1}\n\n'
    t.restart()  # the worker died mid-event: its ids never reached the client
    assert t.ids == [1] and not t.done
    assert t.feed(b': pdserve-ids 2\r\ndata: {"b": 2}\r\n\r\n') == b'data: {"b": 2}\n\n'
    assert t.ids == [1, 2]


def test_tracker_keeps_the_first_events_id_for_the_resumed_stream() -> None:
    t = StreamTracker()
    t.feed(b'data: {"id": "chatcmpl-1", "created": 7, "choices": []}\n\ndata: {"id": "chatcmpl-1"}\n\n')
    assert t.head == {"pdserve_response_id": "chatcmpl-1", "pdserve_created": 7}
    native = StreamTracker()
    native.feed(b'data: {"text": "a", "meta_info": {"id": "abc"}}\n\n')
    assert native.head == {"rid": "abc"}
