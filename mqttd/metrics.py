"""Prometheus metrics in the text exposition format (version 0.0.4), from a snapshot of the
broker's counters taken in the trio thread: counters end in ``_total``, gauges do not; every
family has its HELP and TYPE lines; label values are escaped. Per-client series only for the
clients whose id matches an opt-in pattern (``http.metrics_clients``), so that the number of
series stays bounded. Sans-IO: the HTTP server calls :func:`render`.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable, Mapping
from typing import Any

from mqttd import cluster_view

# name, type, help, the stats key (or a function of the stats)
_BROKER: tuple[tuple[str, str, str, str], ...] = (
    ("mqttd_connections", "gauge", "Client connections open now.", "connections"),
    ("mqttd_sessions", "gauge", "Sessions (connected or persistent and away).", "sessions"),
    ("mqttd_subscriptions", "gauge", "Subscriptions (topic filters), shared ones included.",
     "subscriptions"),
    ("mqttd_retained_messages", "gauge", "Retained messages.", "retained"),
    ("mqttd_queued_messages", "gauge", "Messages queued for sessions' inflight windows.",
     "queued"),
    ("mqttd_inflight_messages", "gauge", "QoS 1/2 messages sent and not yet acknowledged.",
     "inflight"),
    ("mqttd_messages_received_total", "counter", "PUBLISH packets received.",
     "messages_received"),
    ("mqttd_messages_sent_total", "counter", "PUBLISH packets sent to subscribers.",
     "messages_sent"),
    ("mqttd_bytes_received_total", "counter", "Bytes read from clients.", "bytes_received"),
    ("mqttd_bytes_sent_total", "counter", "Bytes written to clients.", "bytes_sent"),
    ("mqttd_connections_total", "counter", "Connections accepted.", "connections_total"),
    ("mqttd_store_commits_total", "counter", "Group commits of the store.", "store_commits"),
    ("mqttd_store_writes_total", "counter", "Operations written to the store.", "store_writes"),
    ("mqttd_store_pending_writes", "gauge", "Operations waiting for the next commit.",
     "store_pending"),
    ("mqttd_store_bytes", "gauge", "Bytes of data in the store's database.", "store_bytes"),
    ("mqttd_store_accepting", "gauge",
     "1 while the store has room for new data (disk budget, free-space reserve).",
     "storage_ok"),
    ("mqttd_store_failures_total", "counter", "Commits the disk could not take (retried).",
     "storage_failures"),
    ("mqttd_read_pauses_total", "counter", "Times the broker stopped reading from a client.",
     "read_pauses"),
    ("mqttd_publisher_holds_total", "counter",
     "Times a publisher was held by a backlogged subscriber it feeds.", "publisher_holds"),
    ("mqttd_publishers_held", "gauge", "Publishers held now.", "publishers_held"),
    ("mqttd_stalled_subscribers_total", "counter",
     "Times a subscriber was found stalled and stopped pacing.", "stalled_subscribers"),
    ("mqttd_buffered_bytes", "gauge", "Unsent output bytes, all connections.",
     "buffered_bytes"),
    ("mqttd_bridges_connected", "gauge", "Bridges whose link is up.", "bridges_connected"),
)
# cluster mode only (the stats have these keys then)
_CLUSTER: tuple[tuple[str, str, str, str], ...] = (
    ("mqttd_cluster_nats_connected", "gauge", "1 while this node is connected to NATS.",
     "cluster_nats_connected"),
    ("mqttd_cluster_ready", "gauge",
     "1 while this node serves as part of the cluster (NATS, streams, retained loaded).",
     "cluster_ready"),
    ("mqttd_cluster_exported_total", "counter",
     "Messages accepted here and published to the other nodes.", "cluster_exported"),
    ("mqttd_cluster_imported_total", "counter",
     "Messages from other nodes routed to this node's subscribers.", "cluster_imported"),
    ("mqttd_cluster_import_duplicates_total", "counter",
     "Messages from other nodes dropped as already routed.", "cluster_import_duplicates"),
    ("mqttd_cluster_import_malformed_total", "counter",
     "Messages on mqttd's subjects that were not mqttd's.", "cluster_import_malformed"),
    ("mqttd_cluster_import_expired_total", "counter",
     "Messages from other nodes that arrived after their 5.0 expiry.",
     "cluster_import_expired"),
    ("mqttd_cluster_not_exported_total", "counter",
     "Messages kept on this node: topic too long for a subject, payload over max_payload.",
     "cluster_not_exported"),
    ("mqttd_cluster_backpressure_total", "counter",
     "Times the output to NATS was full and clients were not read.", "cluster_backpressure"),
    ("mqttd_cluster_writer_waiting_messages", "gauge",
     "Messages waiting for room in the output to NATS.", "cluster_writer_waiting"),
    ("mqttd_cluster_writer_pending_bytes", "gauge", "Bytes queued for the NATS connection.",
     "cluster_writer_pending_bytes"),
    ("mqttd_cluster_discarded_bytes_total", "counter",
     "Bytes queued for NATS lost with a broken connection (core NATS is at most once).",
     "cluster_discarded_bytes"),
    ("mqttd_cluster_nats_reconnects_total", "counter", "Reconnections to NATS.",
     "cluster_nats_reconnects"),
    ("mqttd_cluster_subjects", "gauge", "NATS subscriptions for this node's filters.",
     "cluster_subjects"),
    ("mqttd_cluster_retained_stored_total", "counter",
     "Retained messages (and deletes) stored in MQTTD_RET by this node.",
     "cluster_retained_stored"),
    ("mqttd_cluster_retained_pending", "gauge",
     "Retained writes waiting for their JetStream acknowledgement.",
     "cluster_retained_pending"),
    ("mqttd_cluster_retained_retries_total", "counter",
     "Retained writes sent again after a failure.", "cluster_retained_retries"),
    ("mqttd_cluster_retained_imported_total", "counter",
     "Retained messages of other nodes applied to this node's store.",
     "cluster_retained_imported"),
    ("mqttd_cluster_nodes_up", "gauge", "Nodes whose heartbeat is recent (this one included).",
     "cluster_nodes_alive"),
    ("mqttd_cluster_heartbeat_failures_total", "counter",
     "Heartbeats this node could not write to MQTTD_NODES.", "cluster_heartbeat_failures"),
    ("mqttd_cluster_sessions_owned", "gauge",
     "Persistent sessions this node owns (their records in MQTTD_SESS name it).",
     "cluster_sessions_owned"),
    ("mqttd_cluster_sessions_indexed", "gauge",
     "Persistent sessions of the whole cluster in this node's subscription index.",
     "cluster_sessions_indexed"),
    ("mqttd_cluster_queue_written_total", "counter",
     "Copies of messages stored in persistent sessions' queues (MQTTD_Q) by this node.",
     "cluster_queue_written"),
    ("mqttd_cluster_queue_pending", "gauge",
     "Queue copies waiting for their JetStream acknowledgement (their PUBACKs wait).",
     "cluster_queue_pending"),
    ("mqttd_cluster_queue_full_total", "counter",
     "Queue copies refused by a full queue (limits.persistent_max_queued_messages).",
     "cluster_queue_full"),
    ("mqttd_cluster_queue_retries_total", "counter",
     "Queue copies sent again after a failure.", "cluster_queue_retries"),
    ("mqttd_cluster_queue_delivered_total", "counter",
     "Messages read from sessions' queues and sent to their clients here.",
     "cluster_queue_delivered"),
    ("mqttd_cluster_queue_expired_total", "counter",
     "Queued messages not delivered: their 5.0 expiry interval had passed.",
     "cluster_queue_expired"),
    ("mqttd_cluster_queue_purges_total", "counter",
     "Purges of acknowledged messages from sessions' queues.", "cluster_queue_purges"),
    ("mqttd_cluster_claims_total", "counter",
     "Client ids claimed cluster-wide on CONNECT.", "cluster_claims"),
    ("mqttd_cluster_claim_failures_total", "counter",
     "CONNECTs refused because the client id could not be claimed (server unavailable).",
     "cluster_claim_failures"),
    ("mqttd_cluster_claims_local_total", "counter",
     "Clean sessions accepted without a claim while NATS was out of reach.",
     "cluster_claims_local"),
    ("mqttd_cluster_kicks_sent_total", "counter",
     "Requests to another node to close a client id this node claimed.",
     "cluster_kicks_sent"),
    ("mqttd_cluster_kicks_received_total", "counter",
     "Connections or sessions here closed because their client id connected elsewhere.",
     "cluster_kicks_received"),
    ("mqttd_cluster_sessions_fenced_total", "counter",
     "Sessions let go because another node had written their record.",
     "cluster_sessions_fenced"),
    ("mqttd_cluster_sessions_adopted_total", "counter",
     "Sessions of dead nodes (or of this node's earlier boot) this node took over.",
     "cluster_sessions_adopted"),
    ("mqttd_cluster_record_writes_total", "counter",
     "Session record writes to MQTTD_SESS.", "cluster_record_writes"),
    ("mqttd_cluster_paces_sent_total", "counter",
     "Times this node asked another to pause its publishers (its subscribers behind).",
     "cluster_paces_sent"),
    ("mqttd_cluster_paces_received_total", "counter",
     "Times another node asked this one to pause its publishers.", "cluster_paces_received"),
    ("mqttd_cluster_paced_by", "gauge",
     "Nodes asking this one to pause its publishers now (its clients are not read).",
     "cluster_paced_by"),
    ("mqttd_cluster_pacing", "gauge",
     "Nodes this one is asking to pause now (its subscribers are behind on their messages).",
     "cluster_pacing"),
    # wills in MQTTD_WILLS (mqttd.clustering.wills)
    ("mqttd_cluster_wills_local", "gauge",
     "Wills of this node's clients that it keeps in MQTTD_WILLS.", "cluster_wills_local"),
    ("mqttd_cluster_wills_indexed", "gauge", "Wills in MQTTD_WILLS (every node's).",
     "cluster_wills_indexed"),
    ("mqttd_cluster_wills_pending_writes", "gauge",
     "Will writes and deletes not yet acknowledged by JetStream.",
     "cluster_wills_pending_writes"),
    ("mqttd_cluster_wills_written_total", "counter", "Wills written to MQTTD_WILLS.",
     "cluster_wills_written"),
    ("mqttd_cluster_wills_write_failures_total", "counter",
     "Will writes or deletes that failed (retried).", "cluster_wills_write_failures"),
    ("mqttd_cluster_wills_deleted_total", "counter",
     "Wills settled here and deleted from MQTTD_WILLS.", "cluster_wills_deleted"),
    ("mqttd_cluster_wills_stale_deletes_total", "counter",
     "Wills settled here whose key a newer writer had (left alone).",
     "cluster_wills_stale_deletes"),
    ("mqttd_cluster_wills_claimed_total", "counter",
     "Wills of dead nodes this node claimed (its compare-and-set delete won).",
     "cluster_wills_claimed"),
    ("mqttd_cluster_wills_published_for_dead_nodes_total", "counter",
     "Wills of other nodes' clients this node published (their node down).",
     "cluster_wills_published_for_dead_nodes"),
    ("mqttd_cluster_wills_claim_conflicts_total", "counter",
     "Claims of a will that another writer won.", "cluster_wills_claim_conflicts"),
    ("mqttd_cluster_wills_claim_failures_total", "counter",
     "Claims that failed (NATS errors; retried).", "cluster_wills_claim_failures"),
    ("mqttd_cluster_wills_cancelled_total", "counter",
     "Delayed wills of a dead node cancelled: the client came back here in time.",
     "cluster_wills_cancelled"),
    ("mqttd_cluster_wills_denied_total", "counter",
     "Claimed wills not published: the ACL does not allow their topic.",
     "cluster_wills_denied"),
    # shared subscriptions across the nodes (mqttd.clustering.groups)
    ("mqttd_cluster_groups_known", "gauge",
     "Shared subscription groups with members anywhere in the cluster.",
     "cluster_groups_known"),
    ("mqttd_cluster_groups_local", "gauge", "Groups with members on this node.",
     "cluster_groups_local"),
    ("mqttd_cluster_groups_serving", "gauge",
     "Groups with members here whose JetStream consumer answers this node's requests.",
     "cluster_groups_serving"),
    ("mqttd_cluster_groups_written_total", "counter",
     "Copies of messages accepted here stored in MQTTD_GQ for a group.",
     "cluster_groups_written"),
    ("mqttd_cluster_groups_pending", "gauge",
     "Copies for groups waiting for their JetStream PubAck.", "cluster_groups_pending"),
    ("mqttd_cluster_groups_write_retries_total", "counter",
     "Copies for groups sent again after a failure.", "cluster_groups_write_retries"),
    ("mqttd_cluster_groups_not_written_total", "counter",
     "Copies for groups not written: over the NATS server's max_payload.",
     "cluster_groups_not_written"),
    ("mqttd_cluster_groups_delivered_total", "counter",
     "Group messages from MQTTD_GQ handed to a member on this node.",
     "cluster_groups_delivered"),
    ("mqttd_cluster_groups_redelivered_total", "counter",
     "Of those, messages delivered before (anywhere).", "cluster_groups_redelivered"),
    ("mqttd_cluster_groups_acked_total", "counter",
     "Group messages acknowledged to MQTTD_GQ (member's PUBACK/PUBREC, QoS 0 sent).",
     "cluster_groups_acked"),
    ("mqttd_cluster_groups_nacked_total", "counter",
     "Group messages given back to MQTTD_GQ (rejected, member gone).",
     "cluster_groups_nacked"),
    ("mqttd_cluster_groups_dead_lettered_total", "counter",
     "Group messages published to their dead-letter topic.", "cluster_groups_dead_lettered"),
    ("mqttd_cluster_groups_expired_total", "counter",
     "Group messages expired before a member got them.", "cluster_groups_expired"),
    ("mqttd_cluster_groups_held", "gauge",
     "Group messages held by members on this node, unacknowledged.", "cluster_groups_held"),
)
_GROUP: tuple[tuple[str, str, str, str], ...] = (
    ("mqttd_group_members", "gauge", "Members of the consumer group.", "members"),
    ("mqttd_group_in_progress_jobs", "gauge",
     "Jobs sent to a member and not yet acknowledged.", "in_progress"),
    ("mqttd_group_queued_jobs", "gauge",
     "Jobs waiting for a retry or in the RAM part of a member's queue.", "queued"),
    ("mqttd_group_acked_total", "counter", "Jobs acknowledged.", "acked"),
    ("mqttd_group_rejected_total", "counter",
     "Negative acknowledgements (PUBACK/PUBREC reason code >= 0x80).", "rejected"),
    ("mqttd_group_retries_total", "counter",
     "Jobs delivered again (after a rejection, an ack deadline or a member leaving).",
     "retries"),
    ("mqttd_group_ack_timeouts_total", "counter",
     "Ack deadlines passed with the job sent and unacknowledged.", "ack_timeouts"),
    ("mqttd_group_duplicates_total", "counter",
     "Superseded copies acknowledged all the same (processed twice).", "duplicates"),
    ("mqttd_group_dead_lettered_total", "counter", "Jobs published to the dead-letter topic.",
     "dead_lettered"),
    ("mqttd_group_expired_total", "counter", "Jobs expired while waiting for a retry.",
     "expired"),
)
_DELAYED: tuple[tuple[str, str, str, str], ...] = (
    ("mqttd_delayed_messages", "gauge", "Delayed publishes waiting for their time.",
     "delayed_held"),
    ("mqttd_delayed_published_total", "counter", "Delayed publishes published.",
     "delayed_published"),
    ("mqttd_delayed_refused_total", "counter",
     "Delayed publishes refused (bad or too long a delay, delayed.max_messages held).",
     "delayed_refused"),
    ("mqttd_delayed_expired_total", "counter", "Delayed publishes expired before their time.",
     "delayed_expired"),
)
_DROPPED = (("queue_full", "dropped"), ("qos0_backed_up", "dropped_qos0"))
_REFUSED = (
    ("queue_full", "refused"), ("no_storage", "storage_refused"), ("publish_rate", "rate_refused"),
)
_CLIENT: tuple[tuple[str, str, str, str], ...] = (
    ("mqttd_client_queued_messages", "gauge", "Messages queued for the client.", "queued"),
    ("mqttd_client_queued_bytes", "gauge", "Payload bytes queued for the client.",
     "queued_bytes"),
    ("mqttd_client_inflight_messages", "gauge", "Messages in the client's inflight window.",
     "inflight"),
    ("mqttd_client_messages_sent_total", "counter", "Messages sent to the client.", "sent"),
    ("mqttd_client_messages_dropped_total", "counter",
     "Messages for the client dropped by its queue budget.", "dropped"),
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items()) + "}"


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(
        self, name: str, kind: str, help_text: str,
        samples: Iterable[tuple[Mapping[str, str], float]],
    ) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            number = repr(float(value)) if isinstance(value, float) else str(int(value))
            self.lines.append(f"{name}{_labels(labels)} {number}")


def _cluster_nodes(out: _Writer, cluster: Mapping[str, Any]) -> None:
    """``mqttd_cluster_node_<counter>{node=...}``: each node's counters as its last
    heartbeat carried them (gauges: a node's values go back to 0 when it restarts, and the
    same series are on every node's /metrics)."""
    nodes = cluster.get("nodes", ())
    out.family("mqttd_cluster_node_heartbeat_age_seconds", "gauge",
               "Age of the node's last heartbeat in MQTTD_NODES, per node known.",
               [({"node": n["node"]}, float(n["heartbeat_age_s"])) for n in nodes])
    for name, help_text in cluster_view.COUNTERS:
        out.family(f"mqttd_cluster_node_{name}", "gauge",
                   f"{help_text} As its last heartbeat said, per node known.",
                   [({"node": n["node"]}, n["counters"][name]) for n in nodes
                    if n["counters"].get(name) is not None])


def process_metrics() -> dict[str, float]:
    """CPU seconds, resident bytes and open file descriptors of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result = {"cpu": usage.ru_utime + usage.ru_stime, "rss": 0.0, "fds": 0.0}
    try:
        with open("/proc/self/statm") as f:
            result["rss"] = float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
        result["fds"] = float(len(os.listdir("/proc/self/fd")))
    except OSError:
        pass
    return result


def render(
    stats: Mapping[str, Any],
    bridges: Iterable[Mapping[str, Any]] = (),
    clients: Mapping[str, Mapping[str, Any]] | None = None,
    process: Mapping[str, float] | None = None,
    groups: Iterable[Mapping[str, Any]] = (),
    cluster_nodes: Mapping[str, bool] | None = None,
    cluster: Mapping[str, Any] | None = None,
) -> str:
    """The exposition text: broker-wide families, per-bridge, per-consumer-group and
    (opt-in) per-client series, in cluster mode the node's and one per node known (with
    ``cluster``, mqttd.cluster_view's overview: every node's heartbeat counters), and the
    standard process metrics."""
    out = _Writer()
    for name, kind, help_text, key in (*_BROKER, *_DELAYED):
        out.family(name, kind, help_text, [({}, stats.get(key, 0))])
    if "cluster_ready" in stats:
        for name, kind, help_text, key in _CLUSTER:
            out.family(name, kind, help_text, [({}, stats.get(key, 0))])
        out.family("mqttd_cluster_node_up", "gauge",
                   "1 while the node's heartbeat in MQTTD_NODES is recent, per node known.",
                   [({"node": n}, int(up)) for n, up in sorted((cluster_nodes or {}).items())])
        if cluster is not None:
            _cluster_nodes(out, cluster)
    groups = list(groups)
    for name, kind, help_text, key in _GROUP:
        out.family(name, kind, help_text,
                   [({"group": g["group"], "filter": g["filter"]}, g.get(key, 0)) for g in groups])
    out.family("mqttd_messages_dropped_total", "counter",
               "Messages dropped, by reason (every drop is counted).",
               [({"reason": reason}, stats.get(key, 0)) for reason, key in _DROPPED])
    out.family("mqttd_messages_refused_total", "counter",
               "PUBLISHes or deliveries refused, by reason (the publisher was told if MQTT 5).",
               [({"reason": reason}, stats.get(key, 0)) for reason, key in _REFUSED])
    bridges = list(bridges)
    out.family("mqttd_bridge_up", "gauge", "1 while the bridge's link is connected.",
               [({"bridge": b["name"]}, int(b.get("state") == "connected")) for b in bridges])
    out.family("mqttd_bridge_forwarded_total", "counter",
               "Messages the bridge forwarded to its remote broker.",
               [({"bridge": b["name"]}, b.get("forwarded", 0)) for b in bridges])
    out.family("mqttd_bridge_received_total", "counter",
               "Messages the bridge received from its remote broker.",
               [({"bridge": b["name"]}, b.get("received", 0)) for b in bridges])
    out.family("mqttd_bridge_queued_messages", "gauge",
               "Messages waiting for the bridge's link.",
               [({"bridge": b["name"]}, b.get("queued", 0)) for b in bridges])
    if clients:
        for name, kind, help_text, key in _CLIENT:
            out.family(name, kind, help_text,
                       [({"client_id": cid}, c.get(key, 0)) for cid, c in sorted(clients.items())])
    proc = process if process is not None else process_metrics()
    out.family("process_cpu_seconds_total", "counter", "User and system CPU seconds.",
               [({}, proc["cpu"])])
    out.family("process_resident_memory_bytes", "gauge", "Resident memory in bytes.",
               [({}, proc["rss"])])
    out.family("process_open_fds", "gauge", "Open file descriptors.", [({}, proc["fds"])])
    return "\n".join(out.lines) + "\n"
