"""The Job lifecycle, pure: naming, what a RayJob's status means, retries, metering.

Nothing here talks to the API. :mod:`gpumesh.operator.reconcile_job` feeds it what the
kopf indexes hold and writes back what it decides.
"""
