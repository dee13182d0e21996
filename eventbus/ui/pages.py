"""The admin page's HTML: the overview, a queue, a topic, the login form, confirmations and
errors. Markup only: what to show comes from views, every value is escaped by markup.fill."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..delivery.policy import Policy
from ..jobs.admin import QueueInfo
from ..ops.history import SERIES, Rates
from .listings import Delayed, Letter
from .markup import Html, age, chart, count, fill, join, link, moment, preview, rate
from .views import PAGE_SIZE, QueueView, TopicView

SERIES_NAMES = {"published": "Publish", "delivered": "Deliver", "acked": "Ack"}
COLUMNS = (  # the overview's queue table: key, heading, numeric
    ("name", "Queue", False),
    ("ready", "Ready", True),
    ("in_flight", "In flight", True),
    ("delayed", "Delayed", True),
    ("dead_letters", "Dead letters", True),
    ("consumers", "Consumers", True),
    ("published", "Publish", True),
    ("delivered", "Deliver", True),
    ("acked", "Ack", True),
    ("spark", "Last 15 min", False),
    ("oldest_unacked_seconds", "Oldest unacked", True),
)
SORTABLE = {key for key, _, _ in COLUMNS if key != "spark"}
DONE = {  # what a finished action says on the page it returns to
    "requeued": "{n} dead letters requeued.",
    "deleted": "{n} dead letters deleted.",
    "cancelled": "{n} delayed messages cancelled.",
    "purged": "{n} ready messages purged.",
}


@dataclass(frozen=True)
class Frame:
    """What every page's frame needs: the node, and the session's form token when logged in
    (for the log-out button) or with auth off."""

    node: str
    csrf: str
    logged_in: bool


def page(frame: Frame, title: str, kind: str, content: Html) -> Html:
    logout = (
        fill(
            '<form method="post" action="/ui/logout" class="logout">{csrf}'
            '<button type="submit" class="link">Log out</button></form>',
            csrf=hidden("csrf", frame.csrf),
        )
        if frame.logged_in
        else Html("")
    )
    return fill(
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="referrer" content="same-origin">'
        "<title>{title} · eventbus</title>"
        '<link rel="stylesheet" href="/ui/static/ui.css">'
        '<script src="/ui/static/ui.js" defer></script></head>'
        '<body data-page="{kind}"><header class="top"><a class="brand" href="/ui">'
        '<span class="logo">◆</span> eventbus</a><span class="node">node {node}</span>'
        '<nav><a href="/ui">Overview</a>{logout}</nav></header>'
        "<main>{content}</main></body></html>",
        title=title,
        kind=kind,
        node=frame.node,
        logout=logout,
        content=content,
    )


def hidden(name: str, value: str) -> Html:
    return fill('<input type="hidden" name="{name}" value="{value}">', name=name, value=value)


def notice(done: str | None, n: str | None, kept: str | None) -> Html:
    """The line an action leaves on the page it returns to (fixed texts: nothing of the URL
    but a number is shown)."""
    parts = []
    if done in DONE and (n or "").isdigit():
        parts.append(
            fill('<p class="notice ok" role="status">{text}</p>', text=DONE[done].format(n=n))
        )
    if (kept or "").isdigit() and kept != "0":
        parts.append(
            fill(
                '<p class="notice bad" role="alert">{kept} could not be requeued (RabbitMQ did '
                "not take them) and stay.</p>",
                kept=kept,
            )
        )
    return join(parts)


# ---- Overview -----------------------------------------------------------------------------


def overview(frame: Frame, data: Mapping[str, Any], sort: str, order: str) -> Html:
    problems = join(fill("<li>{p}</li>", p=p) for p in data["problems"])
    content = fill(
        '<ul class="problems" id="problems">{problems}</ul>'
        '<section><h2>Nodes</h2><div class="cards" id="nodes">{nodes}</div></section>'
        '<section><h2>Totals <span class="muted">counts: the bus\'s, over the queues listed · '
        "rates: this node's</span></h2>"
        '<div class="tiles" id="totals">{totals}</div></section>'
        '<section><h2>Queues <span class="muted" id="queue-count">{n}</span></h2>'
        "{legend}"
        '<div class="scroll"><table class="queues" id="queues" data-sort="{sort}" '
        'data-order="{order}"><thead><tr>{heads}</tr></thead><tbody>{rows}</tbody></table>'
        "</div></section>"
        '<section><h2>Topics <span class="muted">bound through this node</span></h2>'
        '<ul class="topics" id="topics">{topics}</ul></section>'
        '<p class="muted foot">Counts as Admin.GetQueue gives them; rates from this node\'s '
        "counters (as /stats), sampled every {every} s. "
        '<span id="refreshed">Refreshed live.</span></p>',
        problems=problems,
        nodes=join(node_card(node) for node in data["nodes"]),
        totals=totals(data["totals"]),
        n=len(data["queues"]),
        legend=legend(),
        sort=sort,
        order=order,
        heads=join(heading(key, title, sort, order) for key, title, _ in COLUMNS),
        rows=join(queue_row(row) for row in sorted_rows(data["queues"], sort, order)),
        topics=join(topic_item(t) for t in data["topics"]) or Html('<li class="muted">none</li>'),
        every=f"{float(data['sample_seconds']):g}",
    )
    return page(frame, "Overview", "overview", content)


def legend() -> Html:
    keys = join(
        fill('<span class="key"><i class="dot s-{k}"></i>{name}</span>', k=k, name=name)
        for k, name in SERIES_NAMES.items()
    )
    return fill('<p class="legend">{keys}</p>', keys=keys)


def sort_value(row: Mapping[str, Any], key: str) -> Any:
    value = row["rates"].get(key) if key in SERIES_NAMES else row.get(key)
    return (value is None, value if value is not None else 0)


def sorted_rows(rows: Sequence[Mapping[str, Any]], sort: str, order: str) -> list[Any]:
    ordered = sorted(rows, key=lambda row: row["name"])
    if sort == "name":
        return ordered[::-1] if order == "desc" else ordered
    ordered.sort(key=lambda row: sort_value(row, sort)[1], reverse=order == "desc")
    return sorted(ordered, key=lambda row: sort_value(row, sort)[0])  # no value: last


def heading(key: str, title: str, sort: str, order: str) -> Html:
    if key not in SORTABLE:
        return fill('<th scope="col">{title}</th>', title=title)
    numeric = key != "name"
    next_order = "asc" if key == sort and order == "desc" else "desc"
    if key == "name":
        next_order = "desc" if key == sort and order == "asc" else "asc"
    mark = ("▼" if order == "desc" else "▲") if key == sort else ""
    return fill(
        '<th scope="col" class="{cls}"><a href="{href}" data-key="{key}">{title}'
        '<span class="mark">{mark}</span></a></th>',
        cls="num" if numeric else "",
        href=link("/ui", sort=key, order=next_order),
        key=key,
        title=title,
        mark=mark,
    )


def queue_row(row: Mapping[str, Any]) -> Html:
    cells = [
        fill('<th scope="row"><a href="{url}">{name}</a></th>', url=row["url"], name=row["name"]),
        *(number(row[k], warn=k == "dead_letters") for k in COUNTS_SHOWN),
        *(fill('<td class="num">{r}</td>', r=rate(row["rates"][k])) for k in SERIES),
        fill("<td>{svg}</td>", svg=spark_svg(row["spark"])),
        fill('<td class="num">{a}</td>', a=age(row["oldest_unacked_seconds"])),
    ]
    return fill('<tr data-name="{name}">{cells}</tr>', name=row["name"], cells=join(cells))


COUNTS_SHOWN = ("ready", "in_flight", "delayed", "dead_letters", "consumers")


def number(value: int, *, warn: bool = False) -> Html:
    cls = "num bad" if warn and value else "num"
    return fill('<td class="{cls}">{n}</td>', cls=cls, n=count(value))


def spark_svg(paths: Mapping[str, str] | None) -> Html:
    if paths is None:
        return Html('<span class="muted">not sampled</span>')
    lines = join(fill('<path class="s-{k}" d="{d}"/>', k=k, d=d) for k, d in paths.items())
    return fill(
        '<svg class="spark" viewBox="0 0 120 28" width="120" height="28" role="img" '
        'preserveAspectRatio="none" aria-label="rates over the last 15 minutes">{lines}</svg>',
        lines=lines,
    )


def node_card(node: Mapping[str, Any]) -> Html:
    dependencies = node["dependencies"]
    chips = (
        join(
            fill(
                '<span class="chip {cls}" title="{state}">{name}</span>',
                cls=state.split(":")[0],
                state=state,
                name=name,
            )
            for name, state in dependencies.items()
        )
        if dependencies
        else Html('<span class="muted">peer (its dependencies: its own page)</span>')
    )
    return fill(
        '<div class="card"><div class="card-title">{name}{this}</div>'
        '<div class="muted">eventbus {version} · up {uptime}</div><div class="chips">{chips}</div>'
        "</div>",
        name=node["name"],
        this=Html(' <span class="badge">this node</span>') if node["this"] else Html(""),
        version=node["version"],
        uptime=age(node["uptime_seconds"]),
        chips=chips,
    )


def totals(data: Mapping[str, Any]) -> Html:
    """The totals tiles; the script finds each value by its data-total key."""
    tiles = [
        ("queues", "Queues", count(data["queues"]), "count"),
        *((k, TOTAL_NAMES[k], count(data[k]), "count") for k in COUNTS_SHOWN),
        *((k, f"{SERIES_NAMES[k]}, this node", rate(data["rates"][k]), "rate") for k in SERIES),
    ]
    cells = join(
        fill(
            '<div class="tile {cls}"><div class="label">{label}</div>'
            '<div class="value" data-total="{key}" data-format="{kind}">{value}</div></div>',
            cls="bad" if key == "dead_letters" and data[key] else "",
            key=key,
            label=label,
            value=value,
            kind=kind,
        )
        for key, label, value, kind in tiles
    )
    spark = fill(
        '<div class="tile wide"><div class="label">Last 15 min</div>'
        '<div id="total-spark">{svg}</div></div>',
        svg=spark_svg(data["spark"]),
    )
    return join([cells, spark])


TOTAL_NAMES = {
    "ready": "Ready",
    "in_flight": "In flight",
    "delayed": "Delayed",
    "dead_letters": "Dead letters",
    "consumers": "Consumers",
}


def topic_item(topic: Mapping[str, Any]) -> Html:
    return fill(
        '<li><a href="{url}">{name}</a> <span class="muted">{n} groups: {groups}</span></li>',
        url=topic["url"],
        name=topic["name"],
        n=len(topic["groups"]),
        groups=", ".join(topic["groups"]),
    )


# ---- A queue ------------------------------------------------------------------------------


def queue(frame: Frame, view: QueueView, message: Html) -> Html:
    info = view.info
    tiles = [
        ("Ready", count(info.ready)),
        ("In flight", count(info.in_flight)),
        ("Delayed", count(info.delayed)),
        ("Dead letters", count(info.dead_letters)),
        ("Consumers", count(info.consumers)),
        ("Oldest unacked", age(view.oldest_unacked)),
    ]
    content = fill(
        '<p class="crumbs"><a href="/ui">Overview</a> &rsaquo; queue</p>'
        '<h1 class="name">{name}</h1>{topics}'
        "{message}"
        '<div class="tiles">{tiles}</div>'
        '<p class="muted">On this node since it started: {counters}</p>'
        "<section><h2>Rates</h2>{charts}</section>"
        "<section><h2>Retry policy</h2>{policy}</section>"
        '<section id="dead-letters"><h2>Dead letters <span class="muted">{dead}</span></h2>'
        "{letters}</section>"
        '<section id="delayed"><h2>Delayed messages <span class="muted">{delayed_n}</span></h2>'
        "{delayed}</section>"
        '<section id="purge"><h2>Purge</h2><p>Removes the {ready} ready messages from RabbitMQ. '
        "Messages handed out, prefetched, delayed or dead are not touched.</p>"
        '<form method="post" action="/ui/queue/purge">{csrf}{queue}'
        '<button type="submit" class="danger" id="purge-button">Purge…</button></form></section>',
        name=info.name,
        topics=bound_topics(view.topics),
        message=message,
        tiles=join(tile(label, value) for label, value in tiles),
        counters=join(
            (f"{k.replace('_', ' ')} {count(v)}" for k, v in view.counters.items()), " · "
        )
        or "nothing counted",
        charts=charts(view.rates),
        policy=policy(view.policy),
        dead=count(info.dead_letters),
        letters=dead_letters(frame, info.name, view.dead_letters, view.dead_offset),
        delayed_n=count(info.delayed),
        delayed=delayed(frame, view.delayed, view.delayed_offset, ("queue", info.name)),
        ready=count(info.ready),
        csrf=hidden("csrf", frame.csrf),
        queue=hidden("queue", info.name),
    )
    return page(frame, info.name, "queue", content)


def tile(label: str, value: str) -> Html:
    return fill(
        '<div class="tile"><div class="label">{label}</div><div class="value">{value}</div></div>',
        label=label,
        value=value,
    )


def bound_topics(topics: Sequence[str]) -> Html:
    if not topics:
        return Html("")
    links = join(
        fill('<a class="chip" href="{url}">{t}</a>', url=link("/ui/topic", name=t), t=t)
        for t in topics
    )
    return fill('<p class="chips">bound to {links}</p>', links=links)


def charts(rates: Rates | None) -> Html:
    if rates is None:
        return Html('<p class="muted">Not sampled: too many queues are tracked already.</p>')
    figures = join(
        chart(f"{SERIES_NAMES[k]} rate", values, k, rates.every)
        for k, values in rates.series.items()
    )
    return fill('<div class="charts">{figures}</div>', figures=figures)


def policy(rule: Policy) -> Html:
    source = (
        f'[queues."{rule.glob}"]'
        if rule.glob is not None
        else "[delivery] (no [queues] glob matches)"
    )
    if rule.fixed_nack_delay_seconds is not None:
        retry = (
            f"a nack waits {rule.fixed_nack_delay_seconds:g} s; a missed deadline comes back "
            "at once"
        )
    else:
        retry = (
            f"{rule.backoff_min_seconds:g} s doubling per attempt up to "
            f"{rule.backoff_max_seconds:g} s, ±10 %"
        )
    rows = [
        ("From", source),
        ("Ack deadline", f"{rule.ack_deadline_seconds} s"),
        ("Max retries", f"{rule.max_retries} (then a dead letter)"),
        ("Backoff", retry),
        ("Dead letters also to", rule.dead_letter_queue or "—"),
    ]
    cells = join(fill('<tr><th scope="row">{k}</th><td>{v}</td></tr>', k=k, v=v) for k, v in rows)
    return fill('<table class="policy">{cells}</table>', cells=cells)


def dead_letters(frame: Frame, queue: str, letters: Sequence[Letter], offset: int) -> Html:
    if not letters:
        return Html('<p class="muted">None.</p>')
    rows = join(
        fill(
            '<tr><td><input type="checkbox" name="ids" value="{id}" aria-label="select"></td>'
            '<td class="id">{id}</td><td class="num">{attempts}</td>'
            '<td>{failed}<div class="muted">{reason}</div></td>'
            '<td class="body"><code>{body}</code></td><td class="row-actions">'
            '<button type="submit" name="requeue" value="{id}">Requeue</button> '
            '<button type="submit" name="delete" value="{id}" class="danger">Delete</button>'
            "</td></tr>",
            id=d.message_id,
            attempts=d.attempts,
            failed=moment(d.last_failure_at),
            reason=d.reason or "retries used up",
            body=preview(d.head, d.size),
        )
        for d in letters[:PAGE_SIZE]
    )
    return fill(
        '<form method="post" action="/ui/dead-letters" class="listing">{csrf}{queue}'
        '<div class="scroll"><table><thead><tr><th></th><th>Message</th><th class="num">Attempts'
        "</th><th>Last failure</th><th>Body</th><th></th></tr></thead><tbody>{rows}</tbody>"
        '</table></div><div class="actions">'
        '<button type="submit" name="requeue" value="selected">Requeue selected</button> '
        '<button type="submit" name="requeue" value="all">Requeue all</button> '
        '<button type="submit" name="delete" value="selected" class="danger">Delete selected'
        "</button></div></form>{more}",
        csrf=hidden("csrf", frame.csrf),
        queue=hidden("queue", queue),
        rows=rows,
        more=pager(letters, offset, "dead", ("queue", queue), "dead-letters"),
    )


def pager(
    rows: Sequence[object], offset: int, param: str, owner: tuple[str, str], anchor: str
) -> Html:
    """Links to the pages before and after a listing (rows holds one more than a page when
    there are more)."""
    kind, name = owner
    links = []
    if offset > 0:
        back = link(f"/ui/{kind}", **{"name": name, param: max(offset - PAGE_SIZE, 0)})
        links.append(fill('<a href="{u}#{a}">← Previous</a>', u=back, a=anchor))
    if len(rows) > PAGE_SIZE:
        ahead = link(f"/ui/{kind}", **{"name": name, param: offset + PAGE_SIZE})
        links.append(fill('<a href="{u}#{a}">Next →</a>', u=ahead, a=anchor))
    return fill('<p class="pager">{links}</p>', links=join(links, " ")) if links else Html("")


def delayed(frame: Frame, rows: Sequence[Delayed], offset: int, owner: tuple[str, str]) -> Html:
    """Delayed messages of a queue or topic (owner: kind and name), each with Cancel."""
    if not rows:
        return Html('<p class="muted">None.</p>')
    body = join(
        fill(
            '<tr><td><input type="checkbox" name="ids" value="{id}" aria-label="select"></td>'
            '<td class="id">{id}</td><td>{due}{quarantine}</td><td class="body"><code>{body}'
            '</code></td><td class="row-actions"><button type="submit" name="cancel" value="{id}"'
            ' class="danger">Cancel</button></td></tr>',
            id=row.id,
            due=moment(row.due_at),
            quarantine=fill('<div class="bad">quarantined: {r}</div>', r=row.quarantine_reason)
            if row.quarantined_at
            else Html(""),
            body=preview(row.head, row.size),
        )
        for row in rows[:PAGE_SIZE]
    )
    return fill(
        '<form method="post" action="/ui/delayed/cancel" class="listing">{csrf}{back}'
        '<div class="scroll"><table><thead><tr><th></th><th>Message</th><th>Due</th><th>Body</th>'
        "<th></th></tr></thead><tbody>{rows}</tbody></table></div>"
        '<div class="actions"><button type="submit" name="cancel" value="selected" '
        'class="danger">Cancel selected</button></div></form>{more}',
        csrf=hidden("csrf", frame.csrf),
        back=join([hidden("kind", owner[0]), hidden("name", owner[1])]),
        rows=body,
        more=pager(rows, offset, "delayed", owner, "delayed"),
    )


# ---- A topic ------------------------------------------------------------------------------


def topic(frame: Frame, view: TopicView, message: Html) -> Html:
    groups = join(group_row(g) for g in view.groups) or Html(
        '<tr><td colspan="6" class="muted">No group bound through this node since it '
        "connected to RabbitMQ.</td></tr>"
    )
    published = (
        chart("Publish rate", view.rates.series["published"], "published", view.rates.every)
        if view.rates
        else Html('<p class="muted">Nothing published to it through this node.</p>')
    )
    content = fill(
        '<p class="crumbs"><a href="/ui">Overview</a> &rsaquo; topic</p>'
        '<h1 class="name">{name}</h1>'
        "{message}<section><h2>Subscriber groups</h2>"
        '<p class="muted">Groups bound through this node (RabbitMQ does not list an exchange\'s '
        "bindings over AMQP); each group is a queue.</p>"
        '<div class="scroll"><table><thead><tr><th>Group (queue)</th><th class="num">Ready</th>'
        '<th class="num">In flight</th><th class="num">Delayed</th><th class="num">Dead letters'
        '</th><th class="num">Consumers</th></tr></thead><tbody>{groups}</tbody></table></div>'
        "</section><section><h2>Rates</h2>{published}</section>"
        '<section id="delayed"><h2>Delayed messages</h2>{delayed}</section>',
        name=view.name,
        message=message,
        groups=groups,
        published=published,
        delayed=delayed_topic(frame, view),
    )
    return page(frame, view.name, "topic", content)


def delayed_topic(frame: Frame, view: TopicView) -> Html:
    return delayed(frame, view.delayed, view.delayed_offset, ("topic", view.name))


def group_row(group: QueueInfo | str) -> Html:
    if isinstance(group, str):
        return fill(
            '<tr><th scope="row">{n}</th><td colspan="5" class="muted">gone</td></tr>', n=group
        )
    cells = join(number(getattr(group, k)) for k in COUNTS_SHOWN)
    return fill(
        '<tr><th scope="row"><a href="{u}">{n}</a></th>{cells}</tr>',
        u=link("/ui/queue", name=group.name),
        n=group.name,
        cells=cells,
    )


# ---- Forms and answers --------------------------------------------------------------------


def login(node: str, problem: str = "") -> Html:
    content = fill(
        '<section class="narrow"><h1>Log in</h1>'
        "<p>This node asks for the bearer token of an identity with <code>admin = true</code> "
        "(see <code>eventbus token new</code>). It is sent once; the browser then keeps a "
        "session cookie for 8 hours.</p>{problem}"
        '<form method="post" action="/ui/login" class="stack">'
        '<label for="token">Admin token</label>'
        '<input id="token" name="token" type="password" autocomplete="current-password" '
        "required autofocus>"
        '<button type="submit" id="login">Log in</button></form></section>',
        problem=fill('<p class="notice bad" role="alert">{p}</p>', p=problem)
        if problem
        else Html(""),
    )
    return page(Frame(node, "", logged_in=False), "Log in", "login", content)


def confirm(frame: Frame, queue: str, what: str, action: str, fields: Html) -> Html:
    """A confirmation: the queue's name typed again before a destructive action."""
    content = fill(
        '<section class="narrow"><h1>{what}?</h1><p>Type the queue name <code>{queue}</code> '
        "to confirm. This cannot be undone.</p>"
        '<form method="post" action="{action}" class="stack">{csrf}{q}{fields}'
        '<label for="confirm">Queue name</label>'
        '<input id="confirm" name="confirm" autocomplete="off" required>'
        '<div class="actions"><button type="submit" class="danger" id="confirm-button">{what}'
        '</button> <a href="{back}">Cancel</a></div></form></section>',
        what=what,
        queue=queue,
        action=action,
        csrf=hidden("csrf", frame.csrf),
        q=hidden("queue", queue),
        fields=fields,
        back=link("/ui/queue", name=queue),
    )
    return page(frame, what, "confirm", content)


def problem(frame: Frame, status: int, text: str) -> Html:
    content = fill(
        '<section class="narrow"><h1>{status}</h1><p class="notice bad" role="alert">{text}</p>'
        '<p><a href="/ui">Back to the overview</a></p></section>',
        status={400: "Not done", 403: "Refused", 404: "Not found"}.get(status, "Unavailable"),
        text=text,
    )
    return page(frame, "Not done", "problem", content)
