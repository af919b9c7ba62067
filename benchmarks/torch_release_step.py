"""The baseline for benchmarks/pretrain_step.py: one CHMR pretraining step structured as the authors'
PyTorch release computes it, on a batch dumped by the JAX benchmark (same molecules and modalities).

The release needs torch_geometric / torch_scatter / ogb, which this project cannot install offline,
so this file re-creates its step in plain torch with the same architecture and the same work per step:
OGB's GNN_node_Virtualnode (GIN, 5 x 300, batch norm, virtual node; scatter via index_add_ on the
unpadded batch, as PyG would), one projector per modality plus the augmented views, dense N x N
InfoNCE per cellular modality (the release materialises it), VICReg, the tree VQ as a Python loop
over levels with the reverse term, random walks on the context graph and the decoders with a
beta-weighted BCE evaluated on the existing (target, walk step) entries only, as the release selects
them with a boolean mask before the BCE, Adam with coupled L2 and the release's cosine schedule. Eager mode (the release
does not use torch.compile). Run with an interpreter that has torch; numpy is the only other import.

  python benchmarks/torch_release_step.py batch.npz --steps 5 --warmup 2
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ATOM_VOCAB = [119, 5, 12, 12, 10, 6, 6, 2, 2]
BOND_VOCAB = [5, 6, 2]


class Categorical(nn.Module):
    def __init__(self, vocab, dim):
        super().__init__()
        self.tables = nn.ModuleList([nn.Embedding(v, dim) for v in vocab])

    def forward(self, x):
        return sum(t(x[:, i]) for i, t in enumerate(self.tables))


class GIN(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.bond = Categorical(BOND_VOCAB, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.BatchNorm1d(2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))
        self.eps = nn.Parameter(torch.zeros(1))

    def forward(self, h, senders, receivers, edges):
        msg = F.relu(h[senders] + self.bond(edges))
        agg = torch.zeros_like(h).index_add_(0, receivers, msg)
        return self.mlp((1 + self.eps) * h + agg)


class GNNVirtualNode(nn.Module):
    def __init__(self, layers=5, dim=300, dropout=0.5):
        super().__init__()
        self.atom = Categorical(ATOM_VOCAB, dim)
        self.vn = nn.Embedding(1, dim)
        nn.init.zeros_(self.vn.weight)
        self.convs = nn.ModuleList([GIN(dim) for _ in range(layers)])
        self.norms = nn.ModuleList([nn.BatchNorm1d(dim) for _ in range(layers)])
        self.vn_mlps = nn.ModuleList([nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.BatchNorm1d(2 * dim), nn.ReLU(),
            nn.Linear(2 * dim, dim), nn.BatchNorm1d(dim), nn.ReLU()) for _ in range(layers - 1)])
        self.dropout, self.layers = dropout, layers

    def forward(self, nodes, senders, receivers, edges, node_graph, n_graph):
        h = self.atom(nodes)
        vn = self.vn(torch.zeros(n_graph, dtype=torch.long))
        for layer in range(self.layers):
            h_in = h + vn[node_graph]
            out = self.norms[layer](self.convs[layer](h_in, senders, receivers, edges))
            if layer < self.layers - 1:
                out = F.relu(out)
            out = F.dropout(out, self.dropout, self.training) + h_in
            if layer < self.layers - 1:
                pooled = torch.zeros(n_graph, h.shape[1]).index_add_(0, node_graph, h_in) + vn
                vn = vn + F.dropout(self.vn_mlps[layer](pooled), self.dropout, self.training)
            h = out
        return torch.zeros(n_graph, h.shape[1]).index_add_(0, node_graph, h)


def projector(d_in, d_out):
    return nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, d_out), nn.SiLU())


def decoder(d, d_out):
    return nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(0.3), nn.Linear(4 * d, d_out))


class Release(nn.Module):
    def __init__(self, mol_dims, cell_dims, target_dims, dim=300, depth=6):
        super().__init__()
        self.gnn = GNNVirtualNode(dim=dim)
        self.proj = nn.ModuleDict({k: projector(d, dim) for k, d in {**mol_dims, **cell_dims}.items()})
        self.dec = nn.ModuleDict({k: decoder(dim, d) for k, d in target_dims.items()})
        self.codes = nn.Parameter(torch.randn(2 ** (depth + 1), dim))
        self.depth = depth


def infonce(a, p, tau=0.2):
    a, p = F.normalize(a, dim=-1), F.normalize(p, dim=-1)
    logits = a @ p.T / tau                          # the release's dense N x N
    return F.cross_entropy(logits, torch.arange(len(a)))


def vicreg(x, y):
    inv = F.mse_loss(x, y)
    std = lambda z: torch.sqrt(z.var(0) + 1e-4)
    var = F.relu(1 - std(x)).mean() + F.relu(1 - std(y)).mean()
    xc, yc = x - x.mean(0), y - y.mean(0)
    n, d = x.shape
    cov = lambda z: (z.T @ z) / (n - 1)
    off = lambda c: (c - torch.diag(torch.diag(c))).pow(2).sum() / d
    return inv + var + off(cov(xc)) + off(cov(yc))


def tree_vq(codes, p, depth):
    codes = F.normalize(codes, dim=-1)
    pn = F.normalize(p, dim=-1)
    parent = torch.ones(len(p), dtype=torch.long)
    loss = 0.0
    for level in range(1, depth + 1):
        children = torch.stack([2 * parent, 2 * parent + 1], 1)           # [B, 2]
        cand = codes[children]                                             # [B, 2, D]
        cos = (cand * pn[:, None]).sum(-1)
        choice = cos.argmax(1)
        node = children[torch.arange(len(p)), choice]
        q = codes[node]
        loss = loss + (1 - (q.detach() * pn).sum(-1)).mean() + (1 - (q * pn.detach()).sum(-1)).mean()
        # reverse: every code at this level pulled to its nearest sample among those routed to its parent
        level_codes = torch.arange(2 ** level, 2 ** (level + 1))
        sims = codes[level_codes] @ pn.detach().T                          # [2^h, B]
        allowed = (level_codes[:, None] // 2) == parent[None, :]
        best = torch.where(allowed, sims, torch.full_like(sims, -2.0)).max(1).values
        has = allowed.any(1)
        loss = loss + torch.where(has, 1 - best, torch.zeros_like(best)).sum() / has.sum().clamp(min=1)
        parent = node
    return loss / depth


def random_walks(indptr, indices, weights, start, length, gen):
    nodes, beta = [start], [torch.ones(len(start))]
    cur, b = start, torch.ones(len(start))
    for _ in range(length):
        deg = indptr[cur + 1] - indptr[cur]
        r = (torch.rand(len(cur), generator=gen) * deg.clamp(min=1)).long()
        pos = indptr[cur] + r
        stuck = deg == 0
        nxt = torch.where(stuck, cur, indices[pos.clamp(max=len(indices) - 1)])
        w = torch.where(stuck, torch.zeros(len(cur)), weights[pos.clamp(max=len(weights) - 1)])
        b = b * w
        cur = nxt
        nodes.append(cur)
        beta.append(b)
    return torch.stack(nodes, 1), torch.stack(beta, 1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("batch")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    z = np.load(args.batch)
    n_node, n_edge, n_graph = int(z["graph/node_mask"].sum()), int(z["graph/edge_mask"].sum()), int(z["graph/graph_mask"].sum())
    t = lambda k, n=None, dt=None: torch.as_tensor(z[k][:n] if n else z[k], dtype=dt)
    nodes, edges = t("graph/nodes", n_node, torch.long), t("graph/edges", n_edge, torch.long)
    senders, receivers = t("graph/senders", n_edge, torch.long), t("graph/receivers", n_edge, torch.long)
    node_graph = t("graph/node_graph", n_node, torch.long)
    cell_names = sorted(k.split("/")[1] for k in z.files if k.startswith("aug/"))
    inputs = {k.split("/")[1]: t(k, n_graph, torch.float32) for k in z.files if k.startswith("inputs/")}
    aug = {c: t(f"aug/{c}", n_graph, torch.float32) for c in cell_names}
    start = t("node", n_graph, torch.long)
    ctx = {k[4:]: torch.as_tensor(z[k]) for k in z.files if k.startswith("ctx/")}
    indptr, indices, weights = ctx["indptr"].long(), ctx["indices"].long(), ctx["weights"].float()
    node_type, node_row = ctx["node_type"].long(), ctx["node_row"].long()
    types = sorted((int(k.split("/")[1]), k.split("/")[2]) for k in ctx if k.startswith("targets/"))
    targets = {name: (i, ctx[f"targets/{i}/{name}"].float(), ctx[f"target_mask/{i}/{name}"].bool()) for i, name in types}

    mol_dims = {"fingerprint": inputs["fingerprint"].shape[1], "graph": 300}
    model = Release(mol_dims, {c: aug[c].shape[1] for c in cell_names}, {n: v[1].shape[1] for n, v in targets.items()})
    total = 1000
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: math.cos(7 * math.pi / 16 * min(s / total, 1.0)))
    gen = torch.Generator().manual_seed(0)
    model.train()

    def step():
        g = model.gnn(nodes, senders, receivers, edges, node_graph, n_graph)
        proj = {"fingerprint": model.proj["fingerprint"](inputs["fingerprint"]), "graph": model.proj["graph"](g)}
        anchor = proj["fingerprint"] + proj["graph"]
        sca = 0.0
        for c in cell_names:
            pc, pa = model.proj[c](inputs[c]), model.proj[c](aug[c])
            proj[c] = pc
            sca = sca + infonce(anchor, pc) + vicreg(pc, pa)
        vq = sum(tree_vq(model.codes, proj[k], model.depth) for k in proj) / len(proj)
        walk, beta = random_walks(indptr, indices, weights, start, 4, gen)
        cpr = 0.0
        for name, (ti, tgt, tmask) in targets.items():
            logits = model.dec[name](anchor)
            is_t = node_type[walk] == ti
            rows = torch.where(is_t, node_row[walk], torch.zeros_like(walk)).clamp(max=len(tgt) - 1)
            y, m = tgt[rows], tmask[rows] & is_t[..., None]
            # As the release's context_propagation_recon_loss: the BCE of the entries that exist only
            # (boolean-mask selection of the expanded logits, targets and path weights), then their mean.
            w = beta[..., None].expand_as(y)
            bce = F.binary_cross_entropy_with_logits(logits[:, None].expand_as(y)[m], y[m], weight=w[m],
                                                     reduction="none")
            cpr = cpr + (bce.mean() if bce.numel() else bce.sum())
        loss = cpr + 10 * sca + 1 * vq
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return loss

    for _ in range(args.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    seconds = time.perf_counter() - t0
    print(json.dumps({"framework": "torch_release", "platform": "cpu", "devices": 1, "molecules_per_step": n_graph,
                      "step_s": seconds / args.steps, "molecules_per_s": n_graph * args.steps / seconds,
                      "loss": float(loss), "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


if __name__ == "__main__":
    main()
