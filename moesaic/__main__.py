from moesaic.cli import main

raise SystemExit(main())
