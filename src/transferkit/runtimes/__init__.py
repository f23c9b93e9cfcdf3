"""The runtime layer: loading a verified artifact, checking its files, running it and choosing among them.

Below everything that runs an exported model (the export gate, serving, scoring, evaluation's attacks), the way
Polygraphy's backends sit under both its Comparator and its CLI:
- runtime.py: one interface over ONNX Runtime, OpenVINO, TensorRT and torch (AOTInductor), built from a
  manifest entry; torch and TensorRT are imported only inside the runtimes that need them;
- selection.py: which artifact `--runtime` picks (auto: the fastest measured on this machine);
- resolve.py: which stored model and artifact a run serves (exported, verified, in the BentoML model store,
  its files matching their sha256).
Torch-free at import, like serving/, which runs in an image without torch.
"""
