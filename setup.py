from setuptools import setup

with open("txcluster/_version.py") as f:
    version = f.read().split('"')[1]

with open("README.md", encoding="utf-8") as f:
    readme = f.read()

setup(
    name="txcluster",
    version=version,
    description="Node.js cluster for Twisted: one master shares its sockets with N worker processes",
    long_description=readme,
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=["txcluster", "twisted.plugins"],
    package_data={"twisted": ["plugins/txcluster_plugin.py"]},
    install_requires=[
        # 24.10 is the first Twisted built on Automat's TypeMachineBuilder
        # (Automat 24.8), which txcluster's worker lifecycle uses too.
        "twisted[tls]>=24.10.0",
        "automat>=24.8.0",
        "zope.interface",
        # The master's /metrics (--metrics), and the applications' metrics
        # it collects from the workers.
        "prometheus_client>=0.16.0",
    ],
    entry_points={"console_scripts": ["txcluster = txcluster._cli:script"]},
    extras_require={
        "proctitle": ["setproctitle"],
        # autobahn: the WebSocket application of the graceful-stop tests.
        "test": ["treq", "hypothesis", "setproctitle", "autobahn"],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
    ],
)
