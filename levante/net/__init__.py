"""Outbound fetches of untrusted URLs (image URLs, web-search result pages, MCP servers from a config).

    policy.py     which destinations a fetch may reach (address classes, domain allow-list)
    addresses.py  every spelling of a host read as the resolver reads it, and its address class
    fetch.py      the one fetcher: DNS resolved once, the checked address connected to, every
                  redirect hop re-checked, bytes (also after decompression), time and type capped
"""
from levante.net.addresses import address_class, literal_address
from levante.net.fetch import Fetched, FetchFailed, FetchRefused, fetch, guarded_async_client
from levante.net.policy import FetchPolicy

__all__ = ["FetchFailed", "FetchPolicy", "FetchRefused", "Fetched", "address_class", "fetch",
           "guarded_async_client", "literal_address"]
