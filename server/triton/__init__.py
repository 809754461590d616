"""The Triton Inference Server backend.

``palmchat triton`` starts a real ``tritonserver`` (the binary of the ``nvidia-pytriton`` wheel)
serving the ``palmchat`` model: this project's engine inside Triton's Python backend, in
decoupled mode (:mod:`server.triton.model`, started by :mod:`server.triton.server`).
``palmchat serve --backend triton --triton-url HOST:PORT`` makes the gateway stream every chat
from it over gRPC (:mod:`server.triton.client`). :mod:`server.triton.protocol` is what both
sides agree on. Only the Triton side needs the ``triton`` extra; the gateway needs
``tritonclient``, a core dependency.
"""
