from edgebuild.build.cli import main

raise SystemExit(main())
