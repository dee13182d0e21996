"""The admin page at /ui on the HTTP port ([http] ui_enabled = true): an overview of nodes and
queues refreshed live, a page per queue (rates, retry policy, dead letters, delayed messages,
purge) and per topic (its subscriber groups). Server-rendered HTML, one style sheet and one
small script, no build step.

markup: escaping and formats · views: what is shown, as data · pages: the HTML ·
sessions: login sessions and form checks · actions: what the page changes · routes: HTTP.
"""

from .routes import routes
from .views import Parts

__all__ = ["Parts", "routes"]
