"""The piped ring: several processes (devices) each hold some layers and pass activations on.

    topology.py  who holds which layers, hosts and ports: from a plan file or prima.cpp flags
    protocol.py  the wire format (multipart ZeroMQ frames) and socket options
    control.py   the control plane: join, config, heartbeats, errors, stop (a background thread)
    memory.py    prefetch (madvise WILLNEED / touch) and release (DONTNEED) of weight windows
    head.py      rank 0: embedding, its own windows, output head; drives one forward per batch
    worker.py    ranks 1..M-1: receive, compute a window, send on
    launch.py    prima-launch: start every rank of a plan on this machine

Order within a round is rank 1, 2, ..., M-1, then rank 0 (prima.cpp's); a token goes round
k times. Hop h of a step (0 <= h < k*M) is round h // M at ring position h % M, where position
i < M-1 is rank i+1 and position M-1 is rank 0.
"""
