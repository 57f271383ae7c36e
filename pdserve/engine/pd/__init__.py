"""The engine's PD scheduling stages: where a disaggregated request waits while its KV moves.

    unified:  NullStage        (nothing to wait for)
    prefill:  PrefillStage     bootstrap queue → scheduler (chunked prefill) → inflight queue
    decode:   DecodeStage      prealloc queue → transfer queue → scheduler (running batch)

Every stage implements `stage.Stage`; the engine drives it the same way in every mode
(`Engine.step`: aborts, stage poll, schedule, forward, sample, stage after-forward, outputs).
A stage gets narrow collaborators (scheduler, KV manager, stop checker, transfer manager),
never the engine; its `poll` returns what finished and the engine finishes it. Bytes and peers
are `pdserve.disagg`'s business (it never imports the engine).
"""
