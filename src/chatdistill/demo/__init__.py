"""The bundled demo: a fictional shop's support desk plus multilingual small talk.

`data` reads the shipped data at run time; `build` generates and writes it (build time only), from
`support` and `chatterbot`; `kb` holds the facts every support answer states; `questions` holds
how customers ask.
"""
