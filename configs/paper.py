"""The paper's pretraining run: six modalities in the InfoAlign/CHMR corpus layout and the paper's
hyperparameters. Set corpus.path to the directory holding pretrain.zip's raw/ files:

  chmr-jax pretrain --config configs/paper.py --workdir runs/paper --config.corpus.path=/data/pretrain/raw
  chmr-jax pretrain --config configs/paper.py:tpu_pod ...   # every host of a TPU pod (launch/tpu_pod.sh)

Where each value comes from (spec = ../shared/docs/CHMR_SPEC.md):
  batch_size 3072, lr 1e-4, weight decay 1e-8 (coupled L2), Adam     spec §7 (release train script)
  epochs 50                                                          spec §7 (newer upstream README; older text: 300)
  schedule lr * cos(7 pi / 16 * t / T), no warm-up                   spec §7 (release)
  lambda1 = lambda_sca = 10, lambda2 = lambda_vq = 1                 spec §7 (paper's best; lambda2 in {0.1, 1})
  tau 0.2, VICReg weights 1/1/1, eta = mu = 1, depth H = 6           spec §4, §5
  walk length L = 4, decoder dropout 0.3, BCE targets                spec §6
  D = 300, GIN 5 x 300, dropout 0.5, residual                        spec §1, §3
  kNN K = 10, T = 5 propagation steps                                spec §2
  modalities cell = CP-Bray,CP-JUMP (2749), gene = G-CRISPR,G-ORF (1973), expression = GE (978)   spec §1
  anchor = fingerprint + graph + geometry (1D + 2D + 3D)             spec §3; the paper's 3D is a frozen Uni-Mol
                                                                     CLS embedding, offline we use RDKit 3D
                                                                     descriptors (geometry='rdkit3d'); a Uni-Mol
                                                                     matrix can be given as config.geometry=PATH
Choices of chmr_jax, not the paper: imputation 'propagate' and SCA masks 'observed_or_propagated'
(spec §2, §4: the release's behaviour is `imputation='mean'`, `sca_mask='all'`).
"""
from chmr_jax import config_util

VARIANTS = ("default", "tpu_pod")


def get_config(arg: str | None = None):
    arg = config_util.parse_variant(arg, VARIANTS)
    config = config_util.load_sibling(__file__, "default.py", "paper")
    config.geometry = "rdkit3d"
    config.model.molecular = "fingerprint,graph,geometry"
    config.batch.batch_size = 3072
    config.optim.lr = 1e-4
    config.optim.weight_decay = 1e-8
    config.optim.schedule = "release_cosine"
    config.train.epochs = 50
    config.objective.lambda_sca = 10.0
    config.objective.lambda_vq = 1.0
    # 129,592 molecules / 3072 = 43 steps per epoch: checkpoint about once per epoch.
    config.train.checkpoint_every_steps = 50
    if arg == "tpu_pod":
        # Every host runs the same command; jax.distributed.initialize() discovers the pod. The
        # global batch is sharded over all chips; SCA's InfoNCE runs as a ring over them.
        config.train.distributed = True
        config.objective.infonce_impl = "ring"
        config.objective.infonce_block = 512
        config.train.progress = "log"
        # TPU matrix units run bfloat16; parameters, BN statistics and the losses stay float32.
        config.model.dtype = "bfloat16"
        # The collapse diagnostics' eigendecompositions on the logged steps only (every 10th): on TPU they
        # moved 3.5 of a compiled step's 14.5 GB per chip (benchmarks/RESULTS.md "Compiled for TPU").
        # 0 = every logged step: --config.train.log_every_steps=N moves it along.
        config.objective.collapse_every = 0
    return config
