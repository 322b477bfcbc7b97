"""The `megatune` command: ms-swift's `swift export/sft/infer/eval` verbs, dispatched to the component packages."""
