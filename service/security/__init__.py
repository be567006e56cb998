"""Transport security and caller authentication: TLS/mTLS credentials from PEM files (``tls``), bearer tokens
(``tokens``), and logs that never show one (``redaction``).

- **Server TLS** (:func:`bind_grpc`): with ``tls_cert_file`` and ``tls_key_file`` the gRPC port speaks only
  TLS; with ``tls_client_ca_file`` too, a client must present a certificate signed by one of those CAs (mTLS),
  checked in the handshake. :func:`http_ssl_context` gives the HTTP port the same certificate when
  ``http_tls`` is set; it *asks* for a client certificate, and the JSON API (not /metrics) requires one when
  ``tls_client_ca_file`` is set, so mTLS cannot be bypassed through the JSON API.
- **TF Serving channel** (:func:`tfserving_channel`): TLS, optionally with a client certificate (mTLS) and a
  server name to check instead of the target's host.
- **Bearer tokens** (:class:`TokenAuth`, :class:`BearerTokenInterceptor`): the token comes from
  ``auth_token_file`` (one per line, so a new one can be added before the old one is removed) or from the
  ``QUICKDRAW_AUTH_TOKEN`` environment variable, never from the command line. Callers send
  ``authorization: Bearer <token>``; it is compared in constant time (SHA-256 digests through
  ``hmac.compare_digest``, so neither content nor length leaks). ``grpc.health.v1`` is always exempt, server
  reflection when ``auth_exempt_reflection`` is set. A refusal is UNAUTHENTICATED (whatever the caller sent:
  a non-ASCII or control character is an invalid token, never an INTERNAL error), its message never contains
  what the caller sent, and it deserializes nothing: a refused call's message is dropped unread, a refused
  stream is never read. A configured token has at least ``MIN_TOKEN_CHARS`` characters (``service.settings``).
- **Failed authentications** (:class:`AuthFailureLog`) are counted in ``quickdraw_auth_failures_total``
  {transport, reason} and logged at a bounded rate: at most one WARNING line per ``AUTH_LOG_INTERVAL_S`` with
  the count since the last line, never the token.
- **Logs** (:func:`install_log_redaction`): every log record, of every logger at every level, is rendered and
  stripped of ``authorization`` header values, ``Bearer <token>`` strings, the configured tokens and raw header
  lines (aiohttp quotes a malformed header line, token included, in its parse errors), tracebacks included.
- **Clients** (:class:`ClientSecurity`, from the client distribution's ``quickdraw_client.security``, with
  :func:`read_pem`, :func:`channel_credentials`, :func:`valid_token` and :func:`read_token_file`): the same options
  for ``QuickDrawClient``, ``quickdraw classify`` and ``quickdraw loadtest``.

Nothing here logs a token, a key or a request.
"""
