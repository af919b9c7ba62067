"""Stage 4, downstream: what a pretrained encoder is used for: fine-tuning and the benchmark
(finetune), metrics, the stress test and the planted-signal check, embedding export, import of the
authors' checkpoints (convert) and the interpretability report."""
