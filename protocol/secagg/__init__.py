"""Secure aggregation: Bonawitz et al. 2017 with the SecAgg+ neighbour graph (Bell et al. 2020).

The coordinator learns the modular sum of the devices' encoded updates and nothing else
about any single update. Four stages (:class:`protocol.wire.Stage`), each one method on
:class:`SecAggClient` (device) and on :class:`SecAggServer` (coordinator):

1. **advertise keys**: each device u sends two X25519 public keys, ``c_u`` (encryption) and
   ``s_u`` (masking).
2. **share keys**: the server broadcasts the roster. Every device derives the same random
   ``degree``-regular neighbour graph from the round's graph seed, draws a fresh self-mask
   seed ``b_u``, splits ``b_u`` and the private ``s_u`` into t-of-``(degree + 1)`` Shamir
   shares (one per neighbour, one kept by the device itself, as in Flower) and encrypts each
   neighbour's pair with AES-GCM under a key derived from ``c_u`` and the neighbour's ``c_v``
   (HKDF binding the round and both ids). The server relays the ciphertexts; it cannot read
   them. It also gets a commitment ``H(b_u)``.
3. **masked input**: ``y_u = x_u + PRG(b_u) + sum_{v in N(u)} +-PRG(s_uv) mod 2**k``, where
   ``s_uv`` is the X25519 + HKDF secret of the pair and ``N(u)`` the neighbours that
   completed stage 2. The server adds the ``y_u`` into a running sum as they arrive.
4. **unmask**: every survivor reveals, for each neighbour, the share of ``b_v`` if ``v``
   survived or the share of ``s_v`` if ``v`` dropped, never both; and its own share of its
   ``b_u`` (never of its ``s_u``). The server reconstructs
   (checking each secret against the public key or commitment), removes the self-masks of
   survivors and the dangling pairwise masks of dropped devices, and gets the exact sum.

Dropout tolerance: the sum is exact whenever every dropped device keeps at least ``t``
neighbours that answer stage 4 (``t`` shares of ``s_u``) and every surviving device has ``t``
shares of ``b_u`` among those answers (its own counts if it answers, so ``t - 1`` answering
neighbours suffice). Otherwise the server raises
:class:`UnrecoverableError` naming the devices that made the round unrecoverable; it never
returns a wrong sum. Devices with fewer than ``t - 1`` neighbours left after stage 2 could not
be unmasked even if they survived: they are excluded before any mask is applied, so they
cannot spoil the round. How likely that is depends on the degree: ``SecAggParams.dropout``
sizes the default degree for the loss a round is designed to absorb (the coordinator uses its
over-selection surplus plus 10%), see :func:`protocol.secagg.graph.degree_for_dropout`.

Threat model
------------
In scope:

* An **honest-but-curious server** that follows the protocol but records everything it sees:
  it learns only the sum of the survivors' inputs (and who survived). Revealed shares never
  give it both ``b_u`` and ``s_u`` of the same device, so no masked input can be unmasked.
* Up to ``t - 1`` **colluding devices** (possibly together with the server's view, as long
  as the server stays honest-but-curious): any ``t - 1`` shares of a secret are independent
  of it (Shamir), and pairwise masks with honest devices stay unknown to them.
* **Dropouts at any stage**: before stage 2 (the device is simply left out), between stages
  2 and 3 (its pairwise masks are removed with its reconstructed key), during stage 4 (its
  input counts; its self-mask is reconstructed from its neighbours' shares).
* Tampering with relayed ciphertexts is detected (AES-GCM; the associated data binds round,
  sender and recipient, so shares cannot be replayed across rounds or re-addressed).

Out of scope (not defended here):

* A **malicious server** that lies about the roster, the survivor sets or the graph (e.g.
  tells different devices different survivor sets, or claims an honest device dropped to
  collect both of its secrets from different neighbours). Bonawitz et al.'s consistency
  check round with signatures and a PKI, and Bell et al.'s malicious variants, are not
  implemented; the default threshold (strict majority of a neighbourhood) limits but does
  not remove the damage.
* **Sybil** devices: device enrolment and authentication belong to the coordinator.
* **Malicious inputs**: a device may submit any vector in range; clipping is enforced only
  by honest devices (no zero-knowledge range proofs). The coordinator bounds what such an input
  can do from the decoded sum (``protocol.codec.mean_norm_bound``).
* **Differential privacy** of the sum: not here; the server learns the exact sum of the noisy
  inputs when a task asks devices for distributed DP noise (``protocol.dp``).
* Side channels, and the privacy of the neighbour graph (a malicious server choosing the
  graph seed could isolate a device).

Cryptographic choices: X25519; HKDF-SHA256 with ``info`` binding purpose, round id and both
device ids; AES-256-GCM for shares; AES-128-CTR as the mask PRG (keyed with 128 bits of a
32-byte seed); Shamir sharing over GF(2**521 - 1). See :mod:`protocol.secagg.crypto` and
:mod:`protocol.secagg.shamir`.
"""

from protocol.secagg.client import SecAggClient
from protocol.secagg.common import (
    DuplicateInputError,
    SecAggError,
    StageError,
    UnrecoverableError,
    resolve_graph,
    secagg_params_for,
)
from protocol.secagg.crypto import DecryptionError
from protocol.secagg.graph import default_degree, default_threshold, neighbour_graph
from protocol.secagg.server import SecAggServer
from protocol.secagg.shamir import ShamirError

__all__ = [
    "DecryptionError",
    "DuplicateInputError",
    "SecAggClient",
    "SecAggError",
    "SecAggServer",
    "ShamirError",
    "StageError",
    "UnrecoverableError",
    "default_degree",
    "default_threshold",
    "neighbour_graph",
    "resolve_graph",
    "secagg_params_for",
]
