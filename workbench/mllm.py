"""``MultimodalLM``: any Hugging Face causal LM plus per-modality towers spliced in at placeholders.

A *tower* maps ONE raw input tensor to ``[n_tokens, hidden]`` (if it has ``supports_batch = True``
it also maps a stacked batch ``[N, ...] -> [N, n_tokens, hidden]``, which is used when all inputs of
that modality have one shape). In a prompt, each placeholder (``<image>``, ``<audio>``, ...) is
replaced, in prompt order, by the tower tokens of the next input of that modality.

``route_ids`` ([batch, seq], long) are 0 for text tokens and ``k`` for the tokens of the k-th
modality of ``self.route_order`` (1-based); they are set with
:func:`workbench.routing.token_routes` around every LLM call, so routed (DAMC/MMER) layers see them.
Generated tokens after the prompt are text (route 0).

``modal_inputs`` is, per prompt, a dict ``{modality: [tensor, ...]}`` (MCUB's ``"vision"`` key is
accepted for ``"image"``).
"""
from __future__ import annotations

import copy
import functools
import inspect
from typing import Mapping, Sequence

import torch
from torch import nn

from .routing import token_routes

ModalInputs = Mapping[str, Sequence[torch.Tensor]]
_ALIASES = {"vision": "image"}


@functools.lru_cache(maxsize=None)
def _cache_argument(model_class: type) -> str:
    """The keyword a causal LM class's ``forward`` takes the KV cache by, and the name of the cache in its
    output: ``cache`` (transformers 5, where ``past_key_values`` is deprecated) or ``past_key_values`` (4.x)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def kv_cache_argument(llm: nn.Module) -> str:
    """:func:`_cache_argument` of ``llm`` (of the model a peft wrapper holds)."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    return _cache_argument(type(base))


def _norm_inputs(mi: ModalInputs | None) -> dict[str, list[torch.Tensor]]:
    out: dict[str, list[torch.Tensor]] = {}
    for k, v in (mi or {}).items():
        if isinstance(v, torch.Tensor):
            v = [v]
        out[_ALIASES.get(k, k)] = list(v)
    return out


def _stack_positions(per_seq: Sequence[torch.Tensor], T: int, left: bool) -> torch.Tensor:
    """Per-sequence position ids ``[S, n]`` (S streams) padded to ``[S, B, T]`` (pads at 0)."""
    S, dev = per_seq[0].shape[0], per_seq[0].device
    out = torch.zeros(S, len(per_seq), T, dtype=torch.long, device=dev)
    for b, p in enumerate(per_seq):
        n = p.shape[1]
        if left:
            out[:, b, T - n:] = p
        else:
            out[:, b, :n] = p
    return out


def _next_position(pos: torch.Tensor) -> torch.Tensor:
    """``[B]``: the position after each row's largest one (``pos`` ``[B, T]`` or ``[S, B, T]``) - where
    text continues (for 1-D left-padded positions, the last one + 1)."""
    return pos.reshape(-1, *pos.shape[-2:]).amax(dim=(0, 2)) + 1


class MultimodalLM(nn.Module):
    """A causal LM with modality towers (LLaVA-style token splicing)."""

    def __init__(self, llm: nn.Module, tokenizer, towers: Mapping[str, nn.Module],
                 placeholders: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.llm = llm
        self.tokenizer = tokenizer
        self.towers = nn.ModuleDict(dict(towers))
        self.placeholders = dict(placeholders or {m: f"<{m}>" for m in towers})
        missing = [m for m in self.towers if m not in self.placeholders]
        if missing:
            raise ValueError(f"no placeholder given for towers {missing}")
        self.route_order: list[str] = list(self.towers.keys())
        self._ph_ids: dict[int, str] = {}
        for m, ph in self.placeholders.items():
            tid = tokenizer.convert_tokens_to_ids(ph)
            if tid is None or tid == tokenizer.unk_token_id:
                raise ValueError(f"placeholder {ph!r} of modality {m!r} is not a token of the tokenizer")
            self._ph_ids[int(tid)] = m

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    @property
    def hidden_size(self) -> int:
        return self.llm.get_input_embeddings().weight.shape[1]

    def _encode_towers(self, jobs: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Run the towers on ``jobs`` [(modality, raw)], batching per modality where possible."""
        out: list[torch.Tensor | None] = [None] * len(jobs)
        by_mod: dict[str, list[int]] = {}
        for i, (m, _) in enumerate(jobs):
            by_mod.setdefault(m, []).append(i)
        dev = self.device
        for m, idx in by_mod.items():
            if m not in self.towers:
                raise KeyError(f"prompt uses modality {m!r} but the model has towers {list(self.towers)}")
            tower = self.towers[m]
            raws = [jobs[i][1].to(dev) for i in idx]
            if getattr(tower, "supports_batch", False) and len({tuple(r.shape) for r in raws}) == 1:
                toks = tower(torch.stack(raws))
                for j, i in enumerate(idx):
                    out[i] = toks[j]
            else:
                for j, i in enumerate(idx):
                    out[i] = tower(raws[j])
        return out  # type: ignore[return-value]

    def _pieces(self, prompts: Sequence[str], modal_inputs: Sequence[ModalInputs | None],
                answers: Sequence[str] | None = None, answer_eos: bool = True):
        """Per prompt: (embeds [T, H], route_ids [T], labels [T])."""
        if len(modal_inputs) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(modal_inputs)} modal_inputs")
        tok = self.tokenizer
        emb_layer = self.llm.get_input_embeddings()
        dev = self.device
        ids_list = [tok(p)["input_ids"] for p in prompts]
        jobs: list[tuple[str, torch.Tensor]] = []
        plan: list[list[tuple[int, int]]] = []  # per prompt: (position, job index)
        for b, (ids, mi) in enumerate(zip(ids_list, modal_inputs)):
            mi = _norm_inputs(mi)
            used = {m: 0 for m in mi}
            pl = []
            for pos, t in enumerate(ids):
                m = self._ph_ids.get(int(t))
                if m is None:
                    continue
                if used.get(m, 0) >= len(mi.get(m, [])):
                    raise ValueError(f"prompt {b} has more {self.placeholders[m]} placeholders than "
                                     f"{m} inputs ({len(mi.get(m, []))})")
                pl.append((pos, len(jobs)))
                jobs.append((m, mi[m][used[m]]))
                used[m] += 1
            for m, n in used.items():
                if n != len(mi[m]):
                    raise ValueError(f"prompt {b}: {len(mi[m])} {m} inputs but {n} placeholders")
            plan.append(pl)
        tower_out = self._encode_towers(jobs)
        result = []
        for b, ids in enumerate(ids_list):
            ids_t = torch.tensor(ids, dtype=torch.long, device=dev)
            text_emb = emb_layer(ids_t)
            parts, routes = [], []
            start = 0
            for pos, j in plan[b]:
                parts.append(text_emb[start:pos])
                routes.append(torch.zeros(pos - start, dtype=torch.long, device=dev))
                toks = tower_out[j].to(text_emb.dtype)
                parts.append(toks)
                routes.append(torch.full((toks.shape[0],), self.route_order.index(jobs[j][0]) + 1
                                         if jobs[j][0] in self.route_order else 0, dtype=torch.long, device=dev))
                start = pos + 1
            parts.append(text_emb[start:])
            routes.append(torch.zeros(len(ids) - start, dtype=torch.long, device=dev))
            emb, route = torch.cat(parts), torch.cat(routes)
            labels = torch.full((emb.shape[0],), -100, dtype=torch.long, device=dev)
            if answers is not None:
                a_ids = tok(" " + answers[b], add_special_tokens=False)["input_ids"]
                if answer_eos:
                    a_ids = a_ids + [tok.eos_token_id]
                a_t = torch.tensor(a_ids, dtype=torch.long, device=dev)
                emb = torch.cat([emb, emb_layer(a_t)])
                route = torch.cat([route, torch.zeros(len(a_ids), dtype=torch.long, device=dev)])
                labels = torch.cat([labels, a_t])
            result.append((emb, route, labels))
        return result

    @staticmethod
    def _pad(pieces, left: bool = False):
        T = max(p[0].shape[0] for p in pieces)
        B, H = len(pieces), pieces[0][0].shape[1]
        dev, dt = pieces[0][0].device, pieces[0][0].dtype
        emb = torch.zeros(B, T, H, dtype=dt, device=dev)
        mask = torch.zeros(B, T, dtype=torch.long, device=dev)
        routes = torch.zeros(B, T, dtype=torch.long, device=dev)
        labels = torch.full((B, T), -100, dtype=torch.long, device=dev)
        for b, (e, r, l) in enumerate(pieces):
            n = e.shape[0]
            sl = slice(T - n, T) if left else slice(0, n)
            emb[b, sl], mask[b, sl], routes[b, sl], labels[b, sl] = e, 1, r, l
        return emb, mask, routes, labels

    def _prompt_positions(self, prompts: Sequence[str], modal_inputs: Sequence[ModalInputs | None],
                          pieces) -> list[torch.Tensor] | None:
        """Per prompt, the position ids ``[streams, n]`` of its pieces (:meth:`_pieces`) when the LLM
        takes several position streams (Qwen2-VL's 3-D M-RoPE:
        :class:`workbench.compose.MRopeMultimodalLM`); ``None`` here: one 1-D position per token."""
        return None

    def _left_padded_positions(self, prompts, modal_inputs, pieces, mask: torch.Tensor) -> torch.Tensor:
        """Position ids of left-padded prompt pieces: ``[B, T]`` (pads at 0), or ``[streams, B, T]``
        when :meth:`_prompt_positions` gives them."""
        per_prompt = self._prompt_positions(prompts, modal_inputs, pieces)
        if per_prompt is None:
            return (mask.cumsum(1) - 1).clamp(min=0)
        return _stack_positions(per_prompt, mask.shape[1], left=True)

    # ------------------------------------------------------------------ public API
    def embed(self, prompts: Sequence[str] | str, modal_inputs: Sequence[ModalInputs | None] | ModalInputs | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(inputs_embeds [B, T, H], attention_mask [B, T], route_ids [B, T])``, right-padded."""
        if isinstance(prompts, str):
            prompts, modal_inputs = [prompts], [modal_inputs]  # type: ignore[list-item]
        emb, mask, routes, _ = self._pad(self._pieces(prompts, modal_inputs))  # type: ignore[arg-type]
        return emb, mask, routes

    def forward(self, prompts: Sequence[str], modal_inputs: Sequence[ModalInputs | None],
                answers: Sequence[str], answer_eos: bool = True, length_buckets: int = 1):
        """Training forward: the LM loss on the answer tokens only (prompt and modality tokens are
        masked with -100), the mean over every answer token of the batch.

        ``length_buckets=1`` returns the HF output (``.loss``, ``.logits``). ``length_buckets=k > 1``
        sorts the sequences by length and runs the LLM on ``k`` groups, each padded only to its own
        longest sequence; every group's loss is its token-sum divided by the batch's answer-token
        count (HF ``num_items_in_batch``), so the summed ``.loss`` is the same mean (to float
        rounding) at less padding (k = 3: ~30% less CPU per training step on the mini zoo, where
        the longest sequence is ~1.6x the mean). Returns an object with ``.loss`` only."""
        pieces = self._pieces(prompts, modal_inputs, answers, answer_eos)
        if length_buckets <= 1 or len(pieces) < 2:
            emb, mask, routes, labels = self._pad(pieces)
            with token_routes(self.llm, routes):
                return self.llm(inputs_embeds=emb, attention_mask=mask, labels=labels, use_cache=False)
        n_items = sum(int((p[2][1:] != -100).sum()) for p in pieces)  # HF shifts labels by one
        order = sorted(range(len(pieces)), key=lambda i: pieces[i][0].shape[0])
        k = min(int(length_buckets), len(pieces))
        loss = None
        for g in range(k):
            group = [pieces[i] for i in order[g * len(order) // k:(g + 1) * len(order) // k]]
            emb, mask, routes, labels = self._pad(group)
            with token_routes(self.llm, routes):
                part = self.llm(inputs_embeds=emb, attention_mask=mask, labels=labels, use_cache=False,
                                num_items_in_batch=n_items).loss
            loss = part if loss is None else loss + part
        return _Loss(loss)

    def answer_logits(self, prompts: Sequence[str], modal_inputs: Sequence[ModalInputs | None],
                      answers: Sequence[str], answer_eos: bool = True) -> torch.Tensor:
        """The LLM's logits at every position that predicts an answer token - the positions
        :meth:`forward`'s loss is taken on - stacked over the batch in order: ``[answer tokens, vocab]``.
        Two models given the same batch return rows that match one for one (a distillation term
        compares them: :class:`workbench.world.training.PreservingLoss`)."""
        emb, mask, routes, labels = self._pad(self._pieces(prompts, modal_inputs, answers, answer_eos))
        with token_routes(self.llm, routes):
            logits = self.llm(inputs_embeds=emb, attention_mask=mask, use_cache=False).logits
        return logits[:, :-1][labels[:, 1:] != -100]

    @torch.no_grad()
    def score_options_batch(self, prompts: Sequence[str], modal_inputs: Sequence[ModalInputs | None],
                            options: Sequence[Sequence[str]], batch_size: int = 64,
                            shared_prefix: bool = False) -> list[torch.Tensor]:
        """Per prompt, the summed log-likelihood of each option continuation (``" " + option``).

        ``shared_prefix=False`` (the reference): prompt + option is run once per option, ``batch_size``
        sequences at a time. ``shared_prefix=True``: each prompt runs through the LLM **once** and its
        KV cache is shared by its options (``batch_size // 4`` prompts at a time), ~4x less prompt
        work with four options. Prompts are then left-padded with explicit position ids (as
        :meth:`generate_batch`); option tokens are text (route 0). Not bit-identical: the same sums
        in another order / padding differ by ~1e-6 (measured on the mini zoos: max 2.4e-6, no changed
        argmax on 7360 records)."""
        if shared_prefix:
            return self._score_options_shared_prefix(prompts, modal_inputs, options, max(1, batch_size // 4))
        pieces = self._pieces(prompts, modal_inputs)
        prompt_pos = self._prompt_positions(prompts, modal_inputs, pieces)
        tok, emb_layer, dev = self.tokenizer, self.llm.get_input_embeddings(), self.device
        seqs, owners, seq_pos = [], [], []
        for b, (e, r, _) in enumerate(pieces):
            for o in options[b]:
                o_ids = tok(" " + o, add_special_tokens=False)["input_ids"]
                if not o_ids:
                    raise ValueError(f"option {o!r} tokenizes to nothing")
                o_t = torch.tensor(o_ids, dtype=torch.long, device=dev)
                lab = torch.full((e.shape[0] + len(o_ids),), -100, dtype=torch.long, device=dev)
                lab[e.shape[0]:] = o_t
                seqs.append((torch.cat([e, emb_layer(o_t)]), torch.cat([r, torch.zeros_like(o_t)]), lab))
                owners.append(b)
                if prompt_pos is not None:  # the option's text continues after the prompt's largest position
                    p = prompt_pos[b]
                    o_pos = p.max() + 1 + torch.arange(len(o_ids), device=p.device)
                    seq_pos.append(torch.cat([p, o_pos.expand(p.shape[0], -1)], 1))
        scores = torch.empty(len(seqs))
        for s in range(0, len(seqs), batch_size):
            emb, mask, routes, labels = self._pad(seqs[s:s + batch_size])
            pos = _stack_positions(seq_pos[s:s + batch_size], emb.shape[1], left=False) if seq_pos else None
            with token_routes(self.llm, routes):
                logits = self.llm(inputs_embeds=emb, attention_mask=mask, position_ids=pos,
                                  use_cache=False).logits.float()
            logp = torch.log_softmax(logits[:, :-1], -1)
            tgt = labels[:, 1:]
            ok = tgt != -100
            lp = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * ok
            scores[s:s + len(emb)] = lp.sum(1).cpu()
        out, i = [], 0
        for b in range(len(prompts)):
            n = len(options[b])
            out.append(scores[i:i + n])
            i += n
        return out

    def _prefill(self, prompts: Sequence[str], modal_inputs: Sequence[ModalInputs | None]):
        """The prompts through the LLM once, left-padded with explicit position ids, keeping the KV
        cache: ``(last-position logits, KV cache, attention mask, position ids)`` - where option scoring
        and greedy decoding continue from."""
        pieces = self._pieces(prompts, modal_inputs)
        emb, mask, routes, _ = self._pad(pieces, left=True)
        pos = self._left_padded_positions(prompts, modal_inputs, pieces, mask)
        with token_routes(self.llm, routes):
            out = self.llm(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=True)
        return out.logits[:, -1], out[kv_cache_argument(self.llm)], mask, pos

    def _option_scores(self, logits: torch.Tensor, past, mask: torch.Tensor, pos: torch.Tensor,
                       options: Sequence[Sequence[str]], keep_past: bool = False) -> list[torch.Tensor]:
        """Per prompt of a :meth:`_prefill` (its last-position ``logits``, KV cache ``past``, ``mask``,
        ``pos``), the summed log-likelihood of each option (``" " + option``, text route) continuing it.
        An option's first token is scored on ``logits``; only options of more than one token run
        through the LLM, on ``past`` reordered to one copy of its prompt per option (``past`` is
        consumed unless ``keep_past``: then a copy is). Where every option is one token (the mini
        zoo's) the LLM is not called."""
        tok, dev = self.tokenizer, self.device
        last = torch.log_softmax(logits.float(), -1)
        owners, ids = [], []
        for b, opts in enumerate(options):
            for o in opts:
                o_ids = tok(" " + o, add_special_tokens=False)["input_ids"]
                if not o_ids:
                    raise ValueError(f"option {o!r} tokenizes to nothing")
                ids.append(o_ids)
                owners.append(b)
        n, L = len(ids), max(len(i) for i in ids)
        own = torch.tensor(owners, dtype=torch.long, device=dev)
        inp = torch.zeros(n, L, dtype=torch.long, device=dev)
        omask = torch.zeros(n, L, dtype=torch.long, device=dev)
        for k, o_ids in enumerate(ids):
            inp[k, :len(o_ids)] = torch.tensor(o_ids, dtype=torch.long, device=dev)
            omask[k, :len(o_ids)] = 1
        sc = last[own].gather(1, inp[:, :1]).squeeze(1)
        if L > 1:
            past = copy.deepcopy(past) if keep_past else past
            past.reorder_cache(own)  # one copy of its prompt's keys/values per option
            opos = _next_position(pos)[own].view(n, 1) + torch.arange(L, device=dev).view(1, L)
            with token_routes(self.llm, torch.zeros(n, L, dtype=torch.long, device=dev)):
                logits = self.llm(input_ids=inp, attention_mask=torch.cat([mask[own], omask], 1), position_ids=opos,
                                  use_cache=True, **{kv_cache_argument(self.llm): past}).logits
            lp = torch.log_softmax(logits[:, :-1].float(), -1)
            sc = sc + (lp.gather(-1, inp[:, 1:].unsqueeze(-1)).squeeze(-1) * omask[:, 1:]).sum(1)
        sc = sc.cpu()
        out, i = [], 0
        for opts in options:
            out.append(sc[i:i + len(opts)])
            i += len(opts)
        return out

    def _greedy(self, logits: torch.Tensor, past, mask: torch.Tensor, pos: torch.Tensor,
                max_new_tokens: int) -> list[str]:
        """Greedy continuations of the prompts of a :meth:`_prefill` (its last-position ``logits``, KV
        cache ``past``, ``mask``, ``pos``), up to ``max_new_tokens`` tokens or the end-of-sequence token,
        decoded (special tokens dropped); ``past`` is extended."""
        eos, cache_kw = self.tokenizer.eos_token_id, kv_cache_argument(self.llm)
        nxt = logits.argmax(-1)
        B = nxt.shape[0]
        gen = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool)
        last_pos = _next_position(pos) - 1
        for step in range(max_new_tokens):
            for b in range(B):
                if not done[b]:
                    if int(nxt[b]) == eos:
                        done[b] = True
                    else:
                        gen[b].append(int(nxt[b]))
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=mask.device)], 1)
            last_pos = last_pos + 1
            with token_routes(self.llm, torch.zeros(B, 1, dtype=torch.long, device=mask.device)):
                out = self.llm(input_ids=nxt.view(B, 1).to(mask.device), attention_mask=mask,
                               position_ids=last_pos.view(B, 1), use_cache=True, **{cache_kw: past})
            past = out[cache_kw]
            nxt = out.logits[:, -1].argmax(-1)
        return [self.tokenizer.decode(g, skip_special_tokens=True).strip() for g in gen]

    @torch.no_grad()
    def _score_options_shared_prefix(self, prompts: Sequence[str], modal_inputs: Sequence[ModalInputs | None],
                                     options: Sequence[Sequence[str]], batch_size: int) -> list[torch.Tensor]:
        """:meth:`score_options_batch` with ``shared_prefix=True`` (``batch_size`` prompts at a time)."""
        out: list[torch.Tensor] = []
        for s in range(0, len(prompts), batch_size):
            logits, past, mask, pos = self._prefill(prompts[s:s + batch_size], modal_inputs[s:s + batch_size])
            out.extend(self._option_scores(logits, past, mask, pos,
                                           options[s:s + batch_size]))
        return out

    @torch.no_grad()
    def score_and_generate_batch(self, prompts: Sequence[str], modal_inputs: Sequence[ModalInputs | None],
                                 options: Sequence[Sequence[str]], max_new_tokens: int = 8,
                                 batch_size: int = 16) -> tuple[list[torch.Tensor], list[str]]:
        """:meth:`score_options_batch` (``shared_prefix=True``) and :meth:`generate_batch` from one run
        of each prompt: ``batch_size`` prompts are prefilled once, their options scored on a copy of
        the KV cache (where an option has more than one token) and the greedy continuation decoded
        from it. Returns ``(scores, texts)``: the two calls' values, bit for bit where a batch holds
        the same prompts as theirs or prompts of one length (no padding: a row's computation does not
        depend on the batch it is in - the mini zoo's benchmark files, one length each); other left
        padding changes the sums in their last bits (~1e-6, as the shared-prefix scorer against the
        reference)."""
        scores: list[torch.Tensor] = []
        texts: list[str] = []
        for s in range(0, len(prompts), batch_size):
            logits, past, mask, pos = self._prefill(prompts[s:s + batch_size], modal_inputs[s:s + batch_size])
            scores.extend(self._option_scores(logits, past, mask, pos, options[s:s + batch_size], keep_past=True))
            texts.extend(self._greedy(logits, past, mask, pos, max_new_tokens))
        return scores, texts

    def score_options(self, prompt: str, modal_inputs: ModalInputs | None, options: Sequence[str]) -> torch.Tensor:
        """Log-likelihood of each option as the continuation of ``prompt`` ([n_options])."""
        return self.score_options_batch([prompt], [modal_inputs], [options])[0]

    @torch.no_grad()
    def generate_batch(self, prompts: Sequence[str], modal_inputs: Sequence[ModalInputs | None],
                       max_new_tokens: int = 8, batch_size: int = 64) -> list[str]:
        """Greedy decoding with the HF KV cache (left padding, explicit position ids)."""
        outs: list[str] = []
        for s in range(0, len(prompts), batch_size):
            logits, past, mask, pos = self._prefill(prompts[s:s + batch_size], modal_inputs[s:s + batch_size])
            outs.extend(self._greedy(logits, past, mask, pos, max_new_tokens))
        return outs

    def generate(self, prompt: str, modal_inputs: ModalInputs | None = None, max_new_tokens: int = 8) -> str:
        """Greedy generation for one prompt; returns the decoded continuation (special tokens dropped)."""
        return self.generate_batch([prompt], [modal_inputs], max_new_tokens)[0]


class _Loss:
    """The result of a length-bucketed :meth:`MultimodalLM.forward`: the loss only."""

    def __init__(self, loss: torch.Tensor) -> None:
        self.loss = loss
