"""Federation with other trust domains (SPIFFE Federation).

- :mod:`~tessera.server.federation.endpoint`: the bundle endpoint, serving this trust domain's SPIFFE bundle
  document over HTTPS (``https_web`` with a configured certificate, ``https_spiffe`` with the server's SVID).
- :mod:`~tessera.server.federation.fetch`: fetching and checking a foreign bundle from its endpoint.
- :mod:`~tessera.server.federation.refresher`: keeps every federated bundle fresh at its refresh hint and
  keeps the last good one when an endpoint is down or lies.
- :mod:`~tessera.server.federation.admin`: the ``TrustAdmin`` admin service (federation relationships and
  X509-SVID revocation; its authority taint/revoke calls are the ``ca`` commands'), and
  :mod:`~tessera.server.federation.cli` the ``federation`` and ``x509`` commands.
"""
