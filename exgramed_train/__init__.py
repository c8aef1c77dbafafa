"""exgramed_train: LLaVA-Med's two-stage training with ExGra-Med's multi-graph alignment in stage 2.

Entry point: ``python -m exgramed_train {demo,stage1,stage2,evaluate,generate-extended,make-demo}``;
see ``exgramed_train/README.md``.  Modules: :mod:`.data` (records, template,
validation), :mod:`.vision` and :mod:`.model` (LLaVA model), :mod:`.training`
(stages, checkpoints, DDP), :mod:`.evaluation` (VQA metrics), :mod:`.extended`
(extended-context generation), :mod:`.jsonl` (kill-safe JSON-lines files),
:mod:`.make_demo` / :mod:`.tiny` / :mod:`.demo` (the embedded demo).
"""
__all__ = ["__version__"]
__version__ = "0.1.0"
