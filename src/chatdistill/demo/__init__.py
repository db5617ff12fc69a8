"""The bundled demo: a fictional shop's support desk plus multilingual small talk.

`chatdistill.demo.data` builds and reads the shipped data; `kb` holds the facts every support
answer states; `questions` holds how customers ask.
"""
