"""Outbound fetches of untrusted URLs (image URLs, web-search result pages, MCP servers from a config).

    policy.py     which destinations a fetch may reach (address classes, domain allow-list)
    addresses.py  every spelling of a host read as the resolver reads it, and its address class
    fetch.py      the one fetcher: DNS resolved once, the checked address connected to, every
                  redirect hop re-checked, bytes (also after decompression), time and type capped
"""
from levante.net.addresses import address_class, literal_address
from levante.net.policy import FetchPolicy

# The fetcher itself (levante.net.fetch: `fetch`, `guarded_async_client`, FetchRefused, FetchFailed)
# is imported where it is used: it brings httpx and httpcore (and httpx's `rich`), a tenth of a
# second that a `levante serve` which never fetches should not pay at start-up.
__all__ = ["FetchPolicy", "address_class", "literal_address"]
