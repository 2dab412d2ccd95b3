"""Money: prices, the admission hold, settlement and rate limits (one transaction each per request).

``prices`` turns a model's catalog prices into integer micro-units and usage into a cost; ``estimate``
bounds a request's tokens before it runs; ``meter`` holds, limits and settles. No engine knows about any
of it: money wraps a request from the outside (GUIDE §4).
"""
