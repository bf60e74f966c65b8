"""Placement of expert copies onto devices (MoEless, arXiv 2603.06350, expert placement).

Given copies per expert, put every copy on a device so that the slowest device (its copies' work
under the device's latency curve) is as fast as possible, within each device's memory capacity.
Unlike EPLB there is no rule of an equal copy count per device. Two copies of one expert may share
a device: the engine splits the expert's tokens evenly over its copies, so that device then takes
2 / c of the expert, a finer split than one copy per device allows.

1. Greedy seeds (longest processing time first): heaviest copy first onto the device where it
   finishes earliest, plus `churn_penalty_s` when that device has no warm copy from `previous`.
   One seed fills devices freely up to capacity; the other caps every device at an equal share of
   the copies, which is EPLB's packing rule, so the search also starts from EPLB's answer for
   these copies (with the same copies, homogeneous devices and no churn, it is EPLB's answer).
   With a previous placement a third, sticky seed keeps every warm copy still wanted (dropping
   surplus copies from the busiest devices) and adds the missing copies greedily.
2. Local search on the bottleneck device: the best single move, or swap with a copy of another
   expert, that lowers the larger of the two devices' times below the bottleneck, net of the churn
   penalty, until nothing improves. The makespan never rises. The seed with the lower makespan plus
   churn penalty wins.
3. With a previous placement, identical devices are relabelled (greedy matching on shared copies)
   so that the plan lands where its copies are already warm; this changes no device's time.
"""

from __future__ import annotations

import numpy as np

from moeserve.errors import MoeServeError
from moeserve.moeless.fleet import DeviceFleet


def place_replicas(loads: np.ndarray, copies: np.ndarray, fleet: DeviceFleet, previous: np.ndarray | None = None,
                   churn_penalty_s: float = 0.0, max_steps: int | None = None) -> np.ndarray:
    """Assign copies to devices.

    loads:    [L, E] float  tokens per expert (predicted or measured)
    copies:   [L, E] int    copies per expert (from scaling), each >= 1
    previous: [L, E, D] int the placement now in memory (its copies are warm), or None
    churn_penalty_s: seconds of bottleneck time that one new (cold) copy is worth
    -> replicas [L, E, D] int, copies of expert e on device d
    """
    loads = np.asarray(loads, dtype=np.float64)
    copies = np.asarray(copies, dtype=np.int64)
    num_layers, num_experts = loads.shape
    num_devices = fleet.num_devices
    if copies.shape != loads.shape:
        raise MoeServeError("copies and loads must have the same [layers, experts] shape")
    if (copies < 1).any():
        raise MoeServeError("every expert needs at least one copy")
    if (copies.sum(1) > fleet.capacity_experts.sum()).any():
        raise MoeServeError(
            f"{int(copies.sum(1).max())} copies do not fit in {int(fleet.capacity_experts.sum())} device slots")
    if previous is None:
        previous = np.zeros((num_layers, num_experts, num_devices), dtype=np.int64)
    elif previous.shape != (num_layers, num_experts, num_devices):
        raise MoeServeError("previous placement must be [layers, experts, devices]")

    copy_expert, copy_load, valid = _copy_lists(loads, copies)
    copy_time = fleet.fixed_s * (copy_load[..., None] > 0) + fleet.per_token_s * copy_load[..., None]
    capacity = np.broadcast_to(fleet.capacity_experts, (num_layers, num_devices))
    equal_share = np.minimum(capacity, -(-valid.sum(1, keepdims=True) // num_devices))
    seeds = [_greedy_seed(copy_expert, copy_time, valid, previous, churn_penalty_s, cap)
             for cap in (capacity, equal_share)]  # (copy_device [L, N], fits [L]) each

    replicas = np.zeros((num_layers, num_experts, num_devices), dtype=np.int64)
    for layer in range(num_layers):
        n = int(valid[layer].sum())
        experts, times = copy_expert[layer, :n], copy_time[layer, :n]
        steps = max_steps if max_steps is not None else 4 * n
        lower_bound = max(times.min(1).sum() / num_devices, times.min(1).max())
        starts = [devices[layer, :n].copy() for devices, fits in seeds if fits[layer]]
        if previous[layer].any():
            sticky = _sticky_seed(experts, times, previous[layer], fleet.capacity_experts)
            if sticky is not None:
                starts.append(sticky)
        best, best_score = None, np.inf
        for start in starts:
            score = _score(experts, times, start, previous[layer], churn_penalty_s)
            # Without churn the search never raises the makespan, so a seed that does not beat
            # the best result so far cannot win; with churn this is a shortcut.
            if score >= best_score:
                continue
            best, best_score = start.copy(), score
            devices = _local_search(experts, times, start, previous[layer], churn_penalty_s,
                                    fleet.capacity_experts, steps, lower_bound)
            score = _score(experts, times, devices, previous[layer], churn_penalty_s)
            if score < best_score:
                best, best_score = devices, score
        if best is None:  # the free seed always fits when the total capacity does
            raise MoeServeError("no placement fits the device capacities")
        np.add.at(replicas[layer], (experts, best), 1)
        if previous[layer].any():
            replicas[layer] = replicas[layer][:, _match_devices(replicas[layer], previous[layer], fleet)]
    return replicas


def _sticky_seed(experts: np.ndarray, times: np.ndarray, previous: np.ndarray, capacity: np.ndarray) -> np.ndarray | None:
    """Keep the warm copies still wanted, add the rest greedily. -> devices [n], or None if they do not fit.

    experts [n] (heaviest copy first), times [n, D], previous [E, D]
    """
    n, num_devices = times.shape
    num_experts = previous.shape[0]
    want = np.bincount(experts, minlength=num_experts)
    first = np.empty(num_experts, dtype=np.int64)
    first[experts[::-1]] = np.arange(n)[::-1]
    copy_time = times[first]  # [E, D] one copy of e on d
    kept = previous.astype(np.int64)
    device_time = (kept * copy_time).sum(0)
    for e in np.flatnonzero(kept.sum(1) > want):
        for _ in range(int(kept[e].sum() - want[e])):
            d = int(np.argmax(np.where(kept[e] > 0, device_time, -np.inf)))
            kept[e, d] -= 1
            device_time[d] -= copy_time[e, d]
    fill = kept.sum(0)
    if (fill > capacity).any():
        return None
    missing = want - kept.sum(1)
    heaviest_first = experts[np.sort(np.unique(experts, return_index=True)[1])]
    for e in heaviest_first[missing[heaviest_first] > 0]:
        for _ in range(int(missing[e])):
            score = np.where(fill < capacity, device_time + copy_time[e], np.inf)
            d = int(np.argmin(score))
            if not np.isfinite(score[d]):
                return None
            kept[e, d] += 1
            fill[d] += 1
            device_time[d] += copy_time[e, d]
    devices = np.empty(n, dtype=np.int64)
    devices[np.argsort(experts, kind="stable")] = np.repeat(np.tile(np.arange(num_devices), num_experts),
                                                            kept.reshape(-1))
    return devices


def _match_devices(placed: np.ndarray, previous: np.ndarray, fleet: DeviceFleet) -> np.ndarray:
    """Relabelling of devices (only among identical ones) keeping the most copies where they were.

    placed, previous: [E, D] -> source [D]: new device d takes the copies planned for source[d]
    """
    num_devices = placed.shape[1]
    spec = np.stack([fleet.capacity_experts, fleet.fixed_s, fleet.per_token_s], axis=1)
    same = (spec[:, None, :] == spec[None, :, :]).all(-1)
    # shared[i, j]: copies of plan device i already warm on device j, sum_e min(placed, previous),
    # computed as sum over k of [placed >= k]^T [previous >= k]
    shared = np.zeros((num_devices, num_devices))
    for k in range(1, int(min(placed.max(), previous.max())) + 1):
        shared += np.einsum("ei,ej->ij", (placed >= k).astype(np.float64), (previous >= k).astype(np.float64))
    shared = np.where(same, shared, -np.inf)
    source = np.arange(num_devices)
    taken_plan, taken_device = np.zeros(num_devices, bool), np.zeros(num_devices, bool)
    for _ in range(num_devices):
        masked = np.where(taken_plan[:, None] | taken_device[None, :], -np.inf, shared)
        i, j = np.unravel_index(np.argmax(masked), masked.shape)
        if not np.isfinite(masked[i, j]):
            break
        source[j] = i
        taken_plan[i] = taken_device[j] = True
    return source


def _score(experts: np.ndarray, times: np.ndarray, devices: np.ndarray, previous: np.ndarray,
           churn_penalty_s: float) -> float:
    """Makespan plus the churn penalty of the copies not warm in `previous`."""
    num_devices = times.shape[1]
    makespan = np.bincount(devices, weights=times[np.arange(len(devices)), devices], minlength=num_devices).max()
    placed = np.zeros(previous.shape, dtype=np.int64)
    np.add.at(placed, (experts, devices), 1)
    return float(makespan + churn_penalty_s * np.maximum(placed - previous, 0).sum())


def new_copies(replicas: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """Copies that must be loaded (cold) going from `previous` to `replicas`. [..., E, D] -> [...] int."""
    return np.maximum(replicas - previous, 0).sum((-2, -1))


def _copy_lists(loads: np.ndarray, copies: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Copies per layer, heaviest first, padded to the longest layer.

    -> copy_expert [L, N] int, copy_load [L, N] float, valid [L, N] bool
    """
    num_layers, num_experts = loads.shape
    per_copy = loads / copies
    longest = int(copies.sum(1).max())
    copy_expert = np.zeros((num_layers, longest), dtype=np.int64)
    copy_load = np.zeros((num_layers, longest))
    valid = np.zeros((num_layers, longest), dtype=bool)
    for layer in range(num_layers):
        experts = np.repeat(np.arange(num_experts), copies[layer])
        order = np.argsort(-per_copy[layer, experts], kind="stable")
        n = experts.shape[0]
        copy_expert[layer, :n] = experts[order]
        copy_load[layer, :n] = per_copy[layer, experts[order]]
        valid[layer, :n] = True
    return copy_expert, copy_load, valid


def _greedy_seed(copy_expert: np.ndarray, copy_time: np.ndarray, valid: np.ndarray, previous: np.ndarray,
                 churn_penalty_s: float, capacity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each copy, heaviest first, onto the device with room where it finishes earliest (all layers at once).

    copy_expert [L, N], copy_time [L, N, D], valid [L, N], previous [L, E, D], capacity [L, D]
    -> copy_device [L, N], fits [L] (False where some copy found no device with room)
    """
    num_layers, longest = copy_expert.shape
    num_devices = capacity.shape[1]
    device_time = np.zeros((num_layers, num_devices))
    fill = np.zeros((num_layers, num_devices), dtype=np.int64)
    placed = np.zeros(previous.shape, dtype=np.int64)
    copy_device = np.zeros((num_layers, longest), dtype=np.int64)
    layer = np.arange(num_layers)
    fits = np.ones(num_layers, dtype=bool)
    for rank in range(longest):
        expert = copy_expert[:, rank]
        cold = churn_penalty_s * (placed[layer, expert] >= previous[layer, expert])
        score = np.where(fill < capacity, device_time + copy_time[:, rank] + cold, np.inf)
        device = np.argmin(score, axis=1)
        fits &= np.isfinite(score[layer, device]) | ~valid[:, rank]
        live = valid[:, rank] & fits
        lv, dv, ev = layer[live], device[live], expert[live]
        copy_device[lv, rank] = dv
        device_time[lv, dv] += copy_time[lv, rank, dv]
        fill[lv, dv] += 1
        placed[lv, ev, dv] += 1
    return copy_device, fits


def _local_search(experts: np.ndarray, times: np.ndarray, devices: np.ndarray, previous: np.ndarray,
                  churn_penalty_s: float, capacity: np.ndarray, max_steps: int, lower_bound: float) -> np.ndarray:
    """Improve one layer's assignment by moves and swaps off the bottleneck device.

    experts [n] int; times [n, D] seconds of each copy on each device; devices [n] int (updated);
    previous [E, D] warm copies; stops early once the makespan meets `lower_bound` -> devices [n]
    """
    n, num_devices = times.shape
    index = np.arange(n)
    device_time = np.bincount(devices, weights=times[index, devices], minlength=num_devices)
    fill = np.bincount(devices, minlength=num_devices)
    placed = np.zeros(previous.shape, dtype=np.int64)
    np.add.at(placed, (experts, devices), 1)
    churn = churn_penalty_s > 0
    if churn:
        # Adding a copy of e to d costs the penalty unless d had a spare warm copy of e; removing
        # one from d saves it if d holds more copies of e than were warm. Kept up to date below.
        add_cost = churn_penalty_s * (placed >= previous)
        remove_save = churn_penalty_s * (placed > previous)
    for _ in range(max_steps):
        b = int(np.argmax(device_time))
        makespan = device_time[b]
        if not churn and makespan <= lower_bound * (1 + 1e-9):
            break
        on_b = devices == b
        mine, theirs = index[on_b], index[~on_b]
        e_i = experts[mine]
        b_without_i = makespan - times[mine, b]  # [m]

        # Move copy i from b to device d.
        has_room = fill < capacity
        has_room[b] = False
        move_pair = np.maximum(b_without_i[:, None], device_time[None, :] + times[mine])
        move_gain = makespan - move_pair
        move_ok = has_room[None, :] & (move_pair <= makespan)

        # Swap copy i on b with copy j (another expert) on device d_j.
        e_j, d_j = experts[theirs], devices[theirs]
        new_b = b_without_i[:, None] + times[theirs, b][None, :]
        new_d = (device_time[d_j] - times[theirs, d_j])[None, :] + times[mine][:, d_j]
        swap_pair = np.maximum(new_b, new_d)
        swap_gain = makespan - swap_pair
        swap_ok = (e_i[:, None] != e_j[None, :]) & (swap_pair <= makespan)

        if churn:
            move_gain = move_gain - (add_cost[e_i] - remove_save[e_i, b][:, None])
            swap_gain = swap_gain - (add_cost[e_i[:, None], d_j[None, :]] - remove_save[e_i, b][:, None]
                                     + (add_cost[e_j, b] - remove_save[e_j, d_j])[None, :])
        move_gain = np.where(move_ok, move_gain, -np.inf)
        swap_gain = np.where(swap_ok, swap_gain, -np.inf)

        best_move = np.unravel_index(np.argmax(move_gain), move_gain.shape)
        best_swap = np.unravel_index(np.argmax(swap_gain), swap_gain.shape) if swap_gain.size else None
        gain_move = move_gain[best_move]
        gain_swap = swap_gain[best_swap] if best_swap is not None else -np.inf
        if max(gain_move, gain_swap) <= 1e-12 * max(makespan, 1e-30):
            break
        if gain_move >= gain_swap:
            moves = [(mine[best_move[0]], int(best_move[1]))]
        else:
            i, j = mine[best_swap[0]], theirs[best_swap[1]]
            moves = [(i, int(devices[j])), (j, b)]
        for i, to in moves:
            e, src = experts[i], devices[i]
            _relocate(i, to, experts, times, devices, device_time, fill, placed)
            if churn:
                for d in (src, to):
                    add_cost[e, d] = churn_penalty_s * (placed[e, d] >= previous[e, d])
                    remove_save[e, d] = churn_penalty_s * (placed[e, d] > previous[e, d])
    return devices


def _relocate(i: int, to: int, experts: np.ndarray, times: np.ndarray, devices: np.ndarray,
              device_time: np.ndarray, fill: np.ndarray, placed: np.ndarray) -> None:
    src = devices[i]
    device_time[src] -= times[i, src]
    device_time[to] += times[i, to]
    fill[src] -= 1
    fill[to] += 1
    placed[experts[i], src] -= 1
    placed[experts[i], to] += 1
    devices[i] = to
