"""Stage 2, mechanisms: CHMR's four mechanisms and the model that carries them: propagation of
profiles over the kNN graph (Eq. 1), the context graph and its walks (CPR), the contrastive and
VICReg losses (SCA), the Tree-VQ, the NNX model, the objective that sums the terms and the collapse
measures it logs."""
