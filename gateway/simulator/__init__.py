"""A local stand-in for Sinch OAuth and the Conversation API ``messages:send``.

``settings.SimulatorSettings`` configures it, ``server.make_app`` builds the aiohttp
application, ``cli`` embeds it, ``callbacks`` posts signed delivery reports and
inbound messages back to the gateway's webhook, ``ingress`` models each app's MT
queue, ``apps`` renders the App resource.
"""
