"""Engine: the only code that reaches into transformers' internals.

KV caches (:mod:`.cache`), batched generation (:mod:`.generation`), last-token hidden states
(:mod:`.activations`) and several-process sharding (:mod:`.distributed`). Steps call these
and never touch a cache layer or a forward hook themselves.
"""
